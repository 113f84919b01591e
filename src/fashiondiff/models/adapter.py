"""The LoRA adapter's file format: where it sits beside a tuned pipeline, how it is written and
how it is applied to a base model. Training writes it (``fashiondiff.train.lora`` makes the
adapter); ``generate``, ``serve`` and the web page read it, so the format lives here, below both.

Layout: a LoRA-tuned ``models/<kind>/`` holds the merged pipeline and, in ``lora/``
(``ADAPTER_DIR``), the adapter in diffusers' PEFT LoRA format (``ADAPTER_FILE``, safetensors,
its LoraConfig in the metadata). Usage::

    save_adapter(model, "models/prior/lora")
    load_adapter(base_prior, "models/prior/lora", "--prior-lora")   # one-line error on any miss
"""

from __future__ import annotations

from pathlib import Path

import torch

from fashiondiff.errors import PipelineError, first_line

ADAPTER_DIR = "lora"  # <out>/lora/: the LoRA adapter beside the merged pipeline
# save_lora_adapter's file name: diffusers' LORA_WEIGHT_NAME_SAFE.
ADAPTER_FILE = "pytorch_lora_weights.safetensors"


def has_adapter(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def save_adapter(model: torch.nn.Module, folder: str | Path) -> Path:
    """The adapter in diffusers' PEFT LoRA format: ``folder/pytorch_lora_weights.safetensors``
    (its LoraConfig rides in the safetensors metadata, so loading needs nothing else)."""
    model.save_lora_adapter(str(folder), safe_serialization=True)
    return Path(folder) / ADAPTER_FILE


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
        raise PipelineError(
            f"{folder}: cannot apply this LoRA adapter to the {type(model).__name__} ({what}): {first_line(exc)}"
        ) from None
    expected = len(_tensor_names(folder / ADAPTER_FILE))
    loaded = sum(".lora_" in name for name in model.state_dict())
    if not has_adapter(model) or loaded != expected:
        raise PipelineError(
            f"{folder}: {loaded} of the adapter's {expected} LoRA tensors fit the "
            f"{type(model).__name__} ({what}): an adapter of another model?"
        )


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())
