"""The CLIP score in the base prior's own CLIP space, and the encoder that embeds into it.

Usage::

    clip = ClipEncoder(prior_pipeline, image_size=224, batch_size=8)
    score = clip_score(clip.encode_images(images), clip.encode_texts(captions))

Shared by ``evaluate`` and by the validation that training runs as it goes.

* CLIP score (Hessel et al. 2021, torchmetrics' documented formula):
  ``mean over pairs of max(100 * cos(E_image, E_caption), 0)``. torchmetrics' code clamps
  the *mean* instead of each pair; the two agree whenever every cosine is positive,
  as it is for real CLIP models on image/caption pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fashiondiff.errors import PipelineError


def clip_score(image_embeds, text_embeds) -> float:
    """Mean over pairs of ``max(100 * cos(image_i, text_i), 0)`` (rows are paired)."""
    img = np.asarray(image_embeds, np.float64)
    txt = np.asarray(text_embeds, np.float64)
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] == 0:
        raise ValueError(f"clip_score: need two (n, d) arrays of one shape, got {img.shape} and {txt.shape}")
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    cos = np.sum(img * txt, axis=1)
    return float(np.mean(np.maximum(100.0 * cos, 0.0)))


def count_truncated(tokenizer, texts: Sequence[str]) -> int:
    """How many ``texts`` have more tokens (with BOS/EOS) than ``tokenizer.model_max_length``."""
    if not texts:
        return 0
    ids = tokenizer(list(texts), truncation=False, padding=False, verbose=False)["input_ids"]
    return sum(len(row) > tokenizer.model_max_length for row in ids)


class ClipEncoder:
    """The base prior pipeline's CLIP towers, used as the evaluation embedding space.

    Images go through the pipeline's ``image_processor`` at ``image_size`` (params
    ``clip_image_size``) and ``image_encoder`` (projected ``image_embeds``); captions
    through ``tokenizer`` (padded and truncated to ``model_max_length``, 77) and
    ``text_encoder`` (projected ``text_embeds``): exactly what the prior sees.
    """

    def __init__(self, prior_pipeline, image_size: int, batch_size: int = 8) -> None:
        encoder_size = prior_pipeline.image_encoder.config.image_size
        if image_size != encoder_size:
            raise PipelineError(
                f"params: clip_image_size is {image_size} but the base image encoder "
                f"takes {encoder_size}x{encoder_size} images"
            )
        self.image_encoder = prior_pipeline.image_encoder
        self.text_encoder = prior_pipeline.text_encoder
        self.processor = prior_pipeline.image_processor
        self.tokenizer = prior_pipeline.tokenizer
        self.image_size = image_size
        self.batch_size = batch_size

    def encode_images(self, images: Sequence) -> np.ndarray:
        """(n, d) float32 CLIP image embeddings of PIL images."""
        import torch

        size = self.image_size
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixels = self.processor(
                images=batch,
                size={"shortest_edge": size},
                crop_size={"height": size, "width": size},
                return_tensors="pt",
            ).pixel_values
            param = next(self.image_encoder.parameters())
            with torch.no_grad():
                embeds = self.image_encoder(pixels.to(param.device, param.dtype)).image_embeds
            out.append(embeds.float().cpu().numpy())
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 CLIP text embeddings; captions over 77 tokens are truncated."""
        import torch

        out = []
        device = next(self.text_encoder.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            with torch.no_grad():
                embeds = self.text_encoder(
                    input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
                ).text_embeds
            out.append(embeds.float().cpu().numpy())
        return np.concatenate(out)

    def count_truncated(self, texts: Sequence[str]) -> int:
        return count_truncated(self.tokenizer, texts)
