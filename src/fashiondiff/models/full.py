"""Kandinsky 2.1 at full size with random weights, built from its published configs.

For GPU benchmarks of the real architecture (no download) and for the memory estimate
of the README::

    python -m fashiondiff.models.full          # parameter counts and training-memory estimate

The configs below are those of ``kandinsky-community/kandinsky-2-1-prior`` and
``kandinsky-community/kandinsky-2-1`` (CLIP ViT-L/14, XLM-R-large M-CLIP, 20-layer
prior, 1.2 B-parameter U-Net, MoVQ). ``meta=True`` allocates nothing.
"""

from __future__ import annotations

import contextlib

FULL_PRIOR = dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                  num_embeddings=77, additional_embeddings=4)
FULL_UNET = dict(
    in_channels=4, out_channels=8, addition_embed_type="text_image", attention_head_dim=64,
    block_out_channels=(384, 768, 1152, 1536), cross_attention_dim=768, encoder_hid_dim=1024,
    encoder_hid_dim_type="text_image_proj", layers_per_block=3, resnet_time_scale_shift="scale_shift",
    down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
    up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", class_embed_type=None, sample_size=64,
)
FULL_MOVQ = dict(
    in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, num_vq_embeddings=16384,
    block_out_channels=(128, 256, 256, 512), layers_per_block=2, norm_type="spatial",
    down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
)


def build_full(meta: bool = True) -> dict:
    """Every network of 2.1 at full size (random weights; on the meta device if ``meta``)."""
    from accelerate import init_empty_weights
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import (
        CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection,
    )

    scope = init_empty_weights() if meta else contextlib.nullcontext()
    with scope:
        return {
            "clip_text": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, vocab_size=49408, max_position_embeddings=77)),
            "clip_vision": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)),
            "prior": PriorTransformer(**FULL_PRIOR),
            "mclip": MultilingualCLIP(MCLIPConfig(
                transformerDimSize=1024, imageDimSize=768, hidden_size=1024, intermediate_size=4096,
                num_hidden_layers=24, num_attention_heads=16, vocab_size=250002,
                max_position_embeddings=514)),
            "unet": UNet2DConditionModel(**FULL_UNET),
            "movq": VQModel(**FULL_MOVQ),
        }


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
        print(f"train {name:6s}: weights+grads+AdamW {training_memory_gib(counts[name]):5.1f} GiB "
              f"(+EMA {training_memory_gib(counts[name], ema=True):5.1f} GiB), plus activations")


if __name__ == "__main__":
    main()
