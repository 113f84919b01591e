"""FLOPs of one training sample, counted by torch on the meta device, and each card's bf16 peak.

Usage::

    per_sample = count_flops("decoder", "full", batch=32)["train_flops_per_sample"]   # 648.9e9
    mfu = per_sample * samples_per_s / peak_flops(torch.cuda.get_device_name())

Shared by bench_gpu_train.py and fullsize.py: the count is never hand-estimated. The networks are
2.1's at their published size (``fashiondiff.models.published``), built on the meta device
(nothing allocated), run forward and backward the way the tasks' losses call them, under
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# Dense bf16 tensor-core peak per card, FLOP/s (NVIDIA's datasheets, without sparsity).
BF16_PEAK = {
    "H200": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}


def shapes(embed: int, mclip: int, latent: int) -> dict:
    """Per-item shapes of the cache: CLIP embedding width, M-CLIP width, latent side."""
    return {
        "prior": {"image_embeds": (embed,), "text_embeds": (embed,), "text_hidden": (77, embed), "text_mask": (77,)},
        "decoder": {
            "latents": (4, latent, latent),
            "mclip_hidden": (77, mclip),
            "mclip_embeds": (embed,),
            "image_embeds": (embed,),
        },
    }


FULL_SHAPES = shapes(768, 1024, 32)  # 2.1: CLIP ViT-L/14, XLM-R-large M-CLIP, 256 px
TINY_SHAPES = shapes(64, 48, 8)  # the embedded default's (--smoke, on the CPU)


def peak_flops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def network(kind: str, smoke: bool, device: str):
    """The network to train: 2.1's at full size, or the tiny one (--smoke)."""
    if smoke:
        from fashiondiff.standin.tiny import build_tiny

        parts = build_tiny(["a b c"], seed=0)
        return parts.prior if kind == "prior" else parts.unet
    from diffusers import PriorTransformer, UNet2DConditionModel

    from fashiondiff.models.published import PRIOR, UNET

    with torch.device(device):
        net = PriorTransformer(**PRIOR) if kind == "prior" else UNet2DConditionModel(**UNET)
    if kind == "prior" and device != "meta":
        net.clip_std.data.fill_(1.0)  # a fresh prior's is 0
    return net


def count_flops(kind: str, mode: str, batch: int, smoke: bool) -> dict:
    """FLOPs of one training step per sample, on the meta device: forward and backward of the
    network as the loss calls it. With gradient checkpointing, the extra forward is reported apart."""
    from torch.utils.flop_counter import FlopCounterMode

    from fashiondiff.train.run import prepare

    shape = (TINY_SHAPES if smoke else FULL_SHAPES)[kind]
    counts = {}
    for checkpointing in (False, True) if "checkpointing" in mode else (False,):
        net = network(kind, smoke, "cpu").to("meta") if smoke else network(kind, False, "meta")
        prepare(net, section_for(kind, mode), kind)
        if checkpointing:
            net.enable_gradient_checkpointing()
            net.train()
        with torch.device("meta"):
            inputs = {k: torch.randn(batch, *s) for k, s in shape.items() if k != "text_mask"}
            t = torch.randint(0, 1000, (batch,))
            with FlopCounterMode(display=False) as counter:
                if kind == "prior":
                    out = net(
                        inputs["image_embeds"],
                        timestep=t,
                        proj_embedding=inputs["text_embeds"],
                        encoder_hidden_states=inputs["text_hidden"],
                        attention_mask=torch.ones(batch, 77, dtype=torch.bool),
                    ).predicted_image_embedding
                else:
                    out = net(
                        inputs["latents"],
                        t,
                        encoder_hidden_states=inputs["mclip_hidden"],
                        added_cond_kwargs={
                            "text_embeds": inputs["mclip_embeds"],
                            "image_embeds": inputs["image_embeds"],
                        },
                    ).sample[:, :4]
                out.float().pow(2).mean().backward()
        counts[checkpointing] = counter.get_total_flops() / batch
    result = {"train_flops_per_sample": counts[False]}
    if True in counts:
        result["recompute_flops_per_sample"] = counts[True] - counts[False]
    return result


def section_for(kind: str, mode: str):
    from fashiondiff.config.whole import load_params

    section = getattr(load_params(REPO / "params.yaml"), kind)
    return section.model_copy(update={"lora_rank": 4 if mode.startswith("lora") else 0})
