"""LoRA: how a model is prepared for the one training loop, and how its adapter is saved.

With ``<kind>.lora_rank > 0`` the prior or U-Net gets a PEFT LoRA adapter through
diffusers' own adapter methods (``add_adapter``), which freezes every base weight: the
loop then trains, clips, averages (EMA) and checkpoints the adapter alone, as it would
any set of trainable parameters. After training::

    save_adapter(model, "models/prior/lora")   # diffusers' PEFT LoRA format, safetensors
    merge_adapter(model)                       # fused into the base weights, adapter gone

so the pipeline folder saved next is a plain diffusers model. To use an adapter without
a merged copy, :func:`load_adapter` (also what ``fashiondiff generate --prior-lora``
calls) applies a saved folder to a fresh base model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fashiondiff.errors import PipelineError

# save_lora_adapter's file name: diffusers' LORA_WEIGHT_NAME_SAFE.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def targets(spec: str) -> list[str]:
    """``lora_targets`` (comma-separated module-name suffixes) as a list."""
    return [t.strip() for t in spec.split(",") if t.strip()]


def add_lora(model: torch.nn.Module, section, key: str) -> int:
    """Add a LoRA adapter described by a ``prior``/``decoder`` params section; return the
    number of trainable (adapter) parameters. ``key`` is the section's name, for errors."""
    from peft import LoraConfig

    config = LoraConfig(r=section.lora_rank, lora_alpha=section.lora_alpha,
                        lora_dropout=section.lora_dropout, target_modules=targets(section.lora_targets))
    try:
        model.add_adapter(config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise PipelineError(f"params: {key}.lora_targets={section.lora_targets!r} matches no module "
                            f"of the {type(model).__name__} ({_first_line(exc)})") from None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_adapter(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def save_adapter(model: torch.nn.Module, folder: str | Path) -> Path:
    """The adapter in diffusers' PEFT LoRA format: ``folder/pytorch_lora_weights.safetensors``
    (its LoraConfig rides in the safetensors metadata, so loading needs nothing else)."""
    model.save_lora_adapter(str(folder), safe_serialization=True)
    return Path(folder) / ADAPTER_FILE


def merge_adapter(model: torch.nn.Module) -> None:
    """Fuse the adapter into the base weights and remove the LoRA layers: the model's
    parameter names and shapes are the base model's again, so save_pretrained writes a
    folder that plain diffusers loads."""
    model.fuse_lora()
    model.unload_lora()


def load_adapter(model: torch.nn.Module, folder: str | Path, what: str) -> None:
    """Apply a saved adapter folder to a base model (``what`` names the option or param).

    The call is diffusers' ``load_lora_adapter(folder, use_safetensors=True, prefix=None)``:
    without ``use_safetensors`` it looks for a pickle ``.bin`` and fails; without
    ``prefix=None`` its default prefix "transformer" filters every key out and it loads
    nothing, with only a logged warning. The check below makes any such miss an error.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_FILE).is_file():
        raise PipelineError(f"{folder}: no LoRA adapter here (no {ADAPTER_FILE}) ({what})")
    try:
        model.load_lora_adapter(str(folder), use_safetensors=True, prefix=None)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise PipelineError(f"{folder}: cannot apply this LoRA adapter to the {type(model).__name__} "
                            f"({what}): {_first_line(exc)}") from None
    expected = len(_tensor_names(folder / ADAPTER_FILE))
    loaded = sum(".lora_" in name for name in model.state_dict())
    if not has_adapter(model) or loaded != expected:
        raise PipelineError(f"{folder}: {loaded} of the adapter's {expected} LoRA tensors fit the "
                            f"{type(model).__name__} ({what}): an adapter of another model?")


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
