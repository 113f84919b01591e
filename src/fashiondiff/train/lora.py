"""LoRA in training: how a model is prepared for the one training loop, and merged after it.

With ``<kind>.lora_rank > 0`` the prior or U-Net gets a PEFT LoRA adapter through
diffusers' own adapter methods (``add_adapter``), which freezes every base weight: the
loop then trains, clips, averages (EMA) and checkpoints the adapter alone, as it would
any set of trainable parameters. After training::

    save_adapter(model, "models/prior/lora")   # fashiondiff.models.adapter: the file format
    merge_adapter(model)                       # fused into the base weights, adapter gone

so the pipeline folder saved next is a plain diffusers model. The adapter's format (where it
sits, how it is saved and applied to a fresh base model) is ``fashiondiff.models.adapter``'s,
which ``generate`` and ``serve`` read without importing training.
"""

from __future__ import annotations

import torch

from fashiondiff.errors import PipelineError, first_line


def targets(spec: str) -> list[str]:
    """``lora_targets`` (comma-separated module-name suffixes) as a list."""
    return [t.strip() for t in spec.split(",") if t.strip()]


def add_lora(model: torch.nn.Module, section, key: str) -> int:
    """Add a LoRA adapter described by a ``prior``/``decoder`` params section; return the
    number of trainable (adapter) parameters. ``key`` is the section's name, for errors."""
    from peft import LoraConfig

    config = LoraConfig(
        r=section.lora_rank,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=targets(section.lora_targets),
    )
    try:
        model.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise PipelineError(
            f"params: {key}.lora_targets={section.lora_targets!r} matches no module "
            f"of the {type(model).__name__} ({first_line(exc)})"
        ) from None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapter(model: torch.nn.Module) -> None:
    """Fuse the adapter into the base weights and remove the LoRA layers: the model's
    parameter names and shapes are the base model's again, so save_pretrained writes a
    folder that plain diffusers loads."""
    model.fuse_lora()
    model.unload_lora()
