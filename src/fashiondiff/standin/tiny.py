"""The embedded tiny Kandinsky 2.1: the very classes of the real model, a few MB in all.

Usage::

    parts = build_tiny(captions, TinySpec(clip_image_size=224))
    save_pipelines(parts, "models/base")   # -> models/base/prior, models/base/decoder

Dimensions follow the constraints of 2.1's wiring (see diffusers' Kandinsky
pipelines): the CLIP projection dim is the prior's ``embedding_dim``, the
MultilingualCLIP ``imageDimSize`` and the U-Net ``cross_attention_dim``; the CLIP
text hidden size equals it too (the prior projects text hidden states with a
``Linear(embedding_dim, inner_dim)``); the MultilingualCLIP hidden size is the
U-Net ``encoder_hid_dim``. Weights start random; ``fashiondiff.standin.pretrain``
teaches the encoders the synthetic data's look before anything is saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    KandinskyPipeline,
    KandinskyPriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    XLMRobertaTokenizer,
)

from fashiondiff.cache.format import TEXT_LENGTH  # CLIP's context length; the prior's num_embeddings
from fashiondiff.standin.tokenizers import train_clip_bpe, train_xlmr_unigram

# XLM-R numbers positions from padding_idx + 1 (= 2), so 77 tokens need position ids up to 78;
# 81 leaves the same 2-position margin as XLM-R's own 514 for 512 tokens.
XLMR_POSITIONS = TEXT_LENGTH + 4


@dataclass(frozen=True)
class TinySpec:
    """Widths of the tiny model. ``embed_dim`` is the shared CLIP image-embedding size."""

    embed_dim: int = 64
    clip_layers: int = 2
    clip_heads: int = 4
    clip_vision_hidden: int = 64
    clip_image_size: int = 224
    clip_patch_size: int = 32
    clip_vocab: int = 1000
    mclip_hidden: int = 48
    mclip_layers: int = 2
    mclip_vocab: int = 1000
    prior_layers: int = 2
    prior_heads: int = 2
    unet_channels: tuple[int, int] = (32, 64)
    # 4 levels: 8x down, as 2.1's MoVQ. Its SpatialNorm has 32 groups, so 32 channels at least;
    # 32 at the second level too: 20% faster than 64 at equal PSNR (400 MoVQ steps)
    movq_channels: tuple[int, ...] = (32, 32, 64, 64)
    movq_codebook: int = 256


@dataclass
class TinyParts:
    """Every component of the two 2.1 pipelines, plus the CLIPModel that joins the towers."""

    clip: CLIPModel
    clip_tokenizer: CLIPTokenizer
    image_processor: CLIPImageProcessor
    prior: PriorTransformer
    prior_scheduler: UnCLIPScheduler
    mclip: MultilingualCLIP
    mclip_tokenizer: XLMRobertaTokenizer
    unet: UNet2DConditionModel
    decoder_scheduler: DDIMScheduler
    movq: VQModel


def train_tokenizers(texts: Iterable[str], spec: TinySpec) -> tuple[CLIPTokenizer, XLMRobertaTokenizer]:
    """Train both tokenizers offline on the captions, deterministically (no vocabulary files).

    CLIP's tokenizer lowercases its input; XLM-R's does not, so it learns the cased text.
    """
    texts = list(texts)
    return (
        train_clip_bpe(texts, spec.clip_vocab, TEXT_LENGTH),
        train_xlmr_unigram(texts, spec.mclip_vocab, TEXT_LENGTH),
    )


def build_tiny(texts: Iterable[str], spec: TinySpec = TinySpec(), seed: int = 0) -> TinyParts:
    """Random-init tiny components of 2.1's classes, tokenizers trained on ``texts``."""
    torch.manual_seed(seed)
    clip_tok, xlm_tok = train_tokenizers(texts, spec)
    d = spec.embed_dim
    clip = CLIPModel(
        CLIPConfig(
            text_config=CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=d,
                intermediate_size=4 * d,
                num_hidden_layers=spec.clip_layers,
                num_attention_heads=spec.clip_heads,
                max_position_embeddings=TEXT_LENGTH,
                projection_dim=d,
                bos_token_id=clip_tok.bos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            ).to_dict(),
            vision_config=CLIPVisionConfig(
                hidden_size=spec.clip_vision_hidden,
                intermediate_size=4 * spec.clip_vision_hidden,
                num_hidden_layers=spec.clip_layers,
                num_attention_heads=spec.clip_heads,
                image_size=spec.clip_image_size,
                patch_size=spec.clip_patch_size,
                projection_dim=d,
            ).to_dict(),
            projection_dim=d,
        )
    )
    size = spec.clip_image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    prior = PriorTransformer(
        num_attention_heads=spec.prior_heads,
        attention_head_dim=d // spec.prior_heads,
        num_layers=spec.prior_layers,
        embedding_dim=d,
        num_embeddings=TEXT_LENGTH,
        additional_embeddings=4,
    )
    with torch.no_grad():  # a fresh prior has clip_std == 0; pretrain sets the real statistics
        prior.clip_std.fill_(1.0)
    mclip = MultilingualCLIP(
        MCLIPConfig(
            transformerDimSize=spec.mclip_hidden,
            imageDimSize=d,
            vocab_size=len(xlm_tok),
            hidden_size=spec.mclip_hidden,
            intermediate_size=4 * spec.mclip_hidden,
            num_hidden_layers=spec.mclip_layers,
            num_attention_heads=4,
            max_position_embeddings=XLMR_POSITIONS,
            pad_token_id=xlm_tok.pad_token_id,
            bos_token_id=xlm_tok.bos_token_id,
            eos_token_id=xlm_tok.eos_token_id,
        )
    )
    c0, c1 = spec.unet_channels
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # 4 epsilon + 4 learned-variance channels, as in 2.1
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(c0, c1),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=d,
        encoder_hid_dim=spec.mclip_hidden,
        encoder_hid_dim_type="text_image_proj",
        addition_embed_type="text_image",
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    n = len(spec.movq_channels)
    movq = VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        vq_embed_dim=4,
        down_block_types=("DownEncoderBlock2D",) * (n - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
        block_out_channels=tuple(spec.movq_channels),
        layers_per_block=1,
        norm_num_groups=8,
        num_vq_embeddings=spec.movq_codebook,
        norm_type="spatial",
    )
    return TinyParts(
        clip=clip,
        clip_tokenizer=clip_tok,
        image_processor=image_processor,
        prior=prior,
        prior_scheduler=prior_scheduler(),
        mclip=mclip,
        mclip_tokenizer=xlm_tok,
        unet=unet,
        decoder_scheduler=decoder_scheduler(),
        movq=movq,
    )


def prior_scheduler() -> UnCLIPScheduler:
    """The scheduler settings of kandinsky-2-1-prior."""
    return UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )


def decoder_scheduler() -> DDIMScheduler:
    """The scheduler settings of kandinsky-2-1 (DDIM over a linear 1000-step schedule)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )


def split_clip(clip: CLIPModel) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """The two towers of a CLIPModel as the ``...WithProjection`` models 2.1's prior uses."""
    text = CLIPTextModelWithProjection(clip.config.text_config)
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    state = clip.state_dict()
    text.load_state_dict({k: v for k, v in state.items() if k.startswith(("text_model.", "text_projection."))})
    vision.load_state_dict({k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))})
    return text.eval(), vision.eval()


def prior_pipeline(parts: TinyParts) -> KandinskyPriorPipeline:
    text, vision = split_clip(parts.clip)
    return KandinskyPriorPipeline(
        prior=parts.prior,
        image_encoder=vision,
        text_encoder=text,
        tokenizer=parts.clip_tokenizer,
        scheduler=parts.prior_scheduler,
        image_processor=parts.image_processor,
    )


def decoder_pipeline(parts: TinyParts) -> KandinskyPipeline:
    return KandinskyPipeline(
        text_encoder=parts.mclip,
        tokenizer=parts.mclip_tokenizer,
        unet=parts.unet,
        scheduler=parts.decoder_scheduler,
        movq=parts.movq,
    )


def save_pipelines(parts: TinyParts, out_dir: str | Path) -> None:
    """Write ``out_dir/prior`` and ``out_dir/decoder`` as diffusers folders (safetensors)."""
    out_dir = Path(out_dir)
    prior_pipeline(parts).save_pretrained(out_dir / "prior", safe_serialization=True)
    decoder_pipeline(parts).save_pretrained(out_dir / "decoder", safe_serialization=True)
