"""The frozen encoders of both 2.1 pipelines, run as the pipelines run them.

Usage::

    enc = load_encoders("models/base/prior", "models/base/decoder")
    texts = encode_texts(enc, ["black leather mini skirt"])        # CLIP and M-CLIP outputs
    images = encode_images(enc, clip_pixels(enc.image_processor, pil_images, 224), movq_px)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from fashiondiff.cache.format import TEXT_LENGTH
from fashiondiff.errors import PipelineError
from fashiondiff.runtime import default_device


@dataclass
class Encoders:
    """The frozen parts of both 2.1 pipelines that the cache needs."""

    prior: str  # the names they were loaded from (recorded in the cache)
    decoder: str
    clip_tokenizer: object
    clip_text: torch.nn.Module
    clip_vision: torch.nn.Module
    image_processor: object
    mclip_tokenizer: object
    mclip: torch.nn.Module
    movq: torch.nn.Module
    device: torch.device


def load_encoders(prior: str, decoder: str, device: str | None = None) -> Encoders:
    """Load only the encoders (no prior, no U-Net) through the one loader."""
    from fashiondiff.models.loader import load_decoder, load_prior

    dev = torch.device(device or default_device())
    p = load_prior(prior, prior=None)
    d = load_decoder(decoder, unet=None)
    for module in (p.text_encoder, p.image_encoder, d.text_encoder, d.movq):
        module.to(dev).eval().requires_grad_(False)
    return Encoders(
        prior=prior, decoder=decoder, clip_tokenizer=p.tokenizer, clip_text=p.text_encoder,
        clip_vision=p.image_encoder, image_processor=p.image_processor,
        mclip_tokenizer=d.tokenizer, mclip=d.text_encoder, movq=d.movq, device=dev,
    )


# The two pixel preparations, one copy for embed and the stand-in's pre-training.
# ``images``: PIL images or (H, W, 3) uint8 arrays.

def movq_pixels(images, resolution: int) -> torch.Tensor:
    """(N, 3, R, R) float32 in [-1, 1] at ``resolution``, resized as KandinskyImg2ImgPipeline does."""
    small = np.stack([np.asarray(_rgb(im).resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1))
                      for im in images])
    return torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def clip_pixels(processor, images, size: int | None = None, chunk: int = 64) -> torch.Tensor:
    """(N, 3, S, S) CLIP pixel values (resize shortest edge, centre crop, normalise) at ``size``
    (None: the processor's own), ``chunk`` images per call of the processor."""
    sizes = {} if size is None else {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    return torch.cat([processor(images=list(images[i:i + chunk]), return_tensors="pt", **sizes)["pixel_values"]
                      for i in range(0, len(images), chunk)])


def _rgb(image) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")


@torch.no_grad()
def encode_texts(enc: Encoders, texts: list[str]) -> dict[str, np.ndarray]:
    """CLIP text outputs (as the prior pipeline computes them) and MultilingualCLIP outputs."""
    tok = enc.clip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt")
    # The prior pipeline calls the CLIP text encoder without a mask and passes the mask to the prior.
    clip_out = enc.clip_text(tok.input_ids.to(enc.device))
    mtok = enc.mclip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                               return_tensors="pt")
    pooled, hidden = enc.mclip(input_ids=mtok.input_ids.to(enc.device),
                               attention_mask=mtok.attention_mask.to(enc.device))
    return {
        "text_embeds": clip_out.text_embeds,
        "text_hidden": clip_out.last_hidden_state,
        "text_mask": tok.attention_mask.bool(),
        "mclip_embeds": pooled,
        "mclip_hidden": hidden,
        "mclip_mask": mtok.attention_mask.bool(),
    }


@torch.no_grad()
def encode_images(enc: Encoders, clip_px: torch.Tensor, movq_px: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": enc.clip_vision(clip_px.to(enc.device)).image_embeds,
        "latents": enc.movq.encode(movq_px.to(enc.device)).latents,
    }


@torch.no_grad()
def blank_image_embed(enc: Encoders) -> torch.Tensor:
    """CLIP embedding of an all-zero pixel tensor: 2.1's negative image embedding (get_zero_embed)."""
    size = enc.clip_vision.config.image_size
    return enc.clip_vision(torch.zeros(1, 3, size, size, device=enc.device)).image_embeds


def caption_lengths(enc: Encoders, texts: list[str]) -> np.ndarray:
    """CLIP tokens (with start and end) of each caption, as the prior pipeline pads them."""
    tok = enc.clip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="np")
    mask = np.asarray(tok["attention_mask"], dtype=bool)
    lengths = mask.sum(axis=1)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        raise PipelineError(f"{enc.prior}: the CLIP tokenizer does not pad on the right; the cache "
                            "stores each caption's leading real tokens only")
    return lengths.astype(np.int64)


def check_sizes(enc: Encoders, clip_image_size: int, resolution: int) -> None:
    native = enc.clip_vision.config.image_size
    if clip_image_size != native:
        raise PipelineError(
            f"params: clip_image_size {clip_image_size} does not match the image encoder of "
            f"{enc.prior} ({native})"
        )
    factor = 2 ** (len(enc.movq.config.block_out_channels) - 1)
    if resolution % (factor * factor):
        raise PipelineError(f"params: model.resolution {resolution} must be a multiple of {factor * factor}")
