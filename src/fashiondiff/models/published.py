"""Kandinsky 2.1's published configurations: the one place they are written.

They are those of ``kandinsky-community/kandinsky-2-1-prior`` and
``kandinsky-community/kandinsky-2-1``: CLIP ViT-L/14 (text and image towers), the 20-layer
prior, M-CLIP (XLM-R-large plus a linear map to CLIP's 768), the 1.2 B-parameter U-Net and
MoVQ. M-CLIP's transformer is XLM-R-large, whose published config
(``FacebookAI/xlm-roberta-large``) has ``type_vocab_size`` 1 and ``layer_norm_eps`` 1e-5: the
BERT defaults ``XLMRobertaConfig`` falls back to (2 and 1e-12) would not load a real
checkpoint's token-type table. Usage::

    python -m fashiondiff.models.published     # parameter counts and training-memory floor
    nets = build_full(meta=True)               # every network at full size, allocating nothing

``fashiondiff.standin.fullsize`` saves them with random weights as the two pipeline folders
(``make fullsize``); the benchmarks build them on the meta device.
"""

from __future__ import annotations

import contextlib

CLIP_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    projection_dim=768,
    vocab_size=49408,
    max_position_embeddings=77,
)
CLIP_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)
PRIOR = dict(
    num_attention_heads=32,
    attention_head_dim=64,
    num_layers=20,
    embedding_dim=768,
    num_embeddings=77,
    additional_embeddings=4,
)
MCLIP = dict(
    transformerDimSize=1024,
    imageDimSize=768,  # M-CLIP's map from XLM-R's width to CLIP's
    vocab_size=250002,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    max_position_embeddings=514,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)
UNET = dict(
    in_channels=4,
    out_channels=8,
    addition_embed_type="text_image",
    attention_head_dim=64,
    block_out_channels=(384, 768, 1152, 1536),
    cross_attention_dim=768,
    encoder_hid_dim=1024,
    encoder_hid_dim_type="text_image_proj",
    layers_per_block=3,
    resnet_time_scale_shift="scale_shift",
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    class_embed_type=None,
    sample_size=64,
)
MOVQ = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    vq_embed_dim=4,
    num_vq_embeddings=16384,
    block_out_channels=(128, 256, 256, 512),
    layers_per_block=2,
    norm_type="spatial",
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
)
# model_index.json of the two pipeline folders (diffusers' version is added when saving)
PRIOR_INDEX = {
    "_class_name": "KandinskyPriorPipeline",
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    "image_processor": ["transformers", "CLIPImageProcessor"],
    "prior": ["diffusers", "PriorTransformer"],
    "scheduler": ["diffusers", "UnCLIPScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
}
DECODER_INDEX = {
    "_class_name": "KandinskyPipeline",
    "movq": ["diffusers", "VQModel"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["kandinsky", "MultilingualCLIP"],
    "tokenizer": ["transformers", "XLMRobertaTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
}


def builders(**text_ids) -> dict:
    """A constructor per network (``clip_text``, ``clip_vision``, ``prior``, ``mclip``, ``unet``,
    ``movq``), at the published sizes; ``text_ids`` (e.g. ``clip_bos_token_id``) override the
    special-token ids of the CLIP text config (``clip_`` prefix) or of M-CLIP's (``mclip_``)."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    clip = {k[len("clip_") :]: v for k, v in text_ids.items() if k.startswith("clip_")}
    mclip = {k[len("mclip_") :]: v for k, v in text_ids.items() if k.startswith("mclip_")}
    return {
        "clip_text": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT, **clip)),
        "clip_vision": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION)),
        "prior": lambda: PriorTransformer(**PRIOR),
        "mclip": lambda: MultilingualCLIP(MCLIPConfig(**{**MCLIP, **mclip})),
        "unet": lambda: UNet2DConditionModel(**UNET),
        "movq": lambda: VQModel(**MOVQ),
    }


def build_full(meta: bool = True) -> dict:
    """Every network of 2.1 at full size (random weights; on the meta device if ``meta``)."""
    from accelerate import init_empty_weights

    with init_empty_weights() if meta else contextlib.nullcontext():
        return {name: build() for name, build in builders().items()}


def training_memory_gib(params: int, ema: bool = False) -> float:
    """Weights, gradients and AdamW moments in fp32 (16 bytes/parameter; +4 with EMA).

    Mixed precision keeps fp32 master weights, so this is the floor before activations.
    """
    return params * (16 + (4 if ema else 0)) / 2**30


def main() -> None:
    nets = build_full(meta=True)
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    for name, count in counts.items():
        print(f"{name:12s} {count / 1e6:9.1f} M parameters  {count * 2 / 2**30:6.2f} GiB in bf16")
    for name in ("prior", "unet"):
        print(
            f"train {name:6s}: weights+grads+AdamW {training_memory_gib(counts[name]):5.1f} GiB "
            f"(+EMA {training_memory_gib(counts[name], ema=True):5.1f} GiB), plus activations"
        )


if __name__ == "__main__":
    main()
