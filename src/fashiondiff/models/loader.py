"""The one loader of base (and tuned) models: a local diffusers folder or a Hub id.

Everything downstream (embed, train, evaluate, generate) loads through here, so the
embedded tiny model exercises exactly the code path of the real Kandinsky 2.1::

    prior = load_prior("models/base/prior")                         # tiny, embedded
    prior = load_prior("kandinsky-community/kandinsky-2-1-prior")   # real, from the HF cache

Stages never download: a Hub id must already be in the local Hugging Face cache
(or be a folder). Otherwise the error says how to fetch it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fashiondiff.errors import PipelineError, first_line

REAL_PRIOR = "kandinsky-community/kandinsky-2-1-prior"
REAL_DECODER = "kandinsky-community/kandinsky-2-1"


def named(key: str) -> str:
    """How a message names where a model came from: a params key as one (``params model.prior``);
    a flag (``--prior``) or a description (``tuned prior``) as given."""
    return f"params {key}" if "." in key and " " not in key and not key.startswith("-") else key


def resolve(name: str, key: str) -> str:
    """A local folder for ``name`` (a folder, or a Hub id in the local cache).

    ``key`` is the params key (``model.prior``) or the flag (``--prior``) that named it, for the
    error message.
    """
    if not name:
        raise PipelineError(f"{named(key)} is empty: give a model folder or a Hub id")
    path = Path(name)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineError(f"{path}: not a diffusers pipeline folder (no model_index.json) ({named(key)})")
        return str(path)
    if path.exists() or name.startswith((".", "/")) or name.count("/") != 1:
        raise PipelineError(f"{name}: no such model folder ({named(key)})")
    # A Hub id: look in the local cache only. Offline mode avoids 25 s of retries.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        folder = f"models/{name.split('/')[-1]}"
        then = (f"pass {key} {folder}" if key.startswith("-") else
                f"set {key}: {folder} in params.yaml" if named(key) != key else f"use {folder} as the {key}")
        raise PipelineError(
            f"{name}: weights not on this machine ({named(key)}); on a connected machine run "
            f"`hf download {name} --local-dir {folder}`, then {then}"
        ) from None


def load_prior(name: str, key: str = "model.prior", torch_dtype=None, **components):
    """``KandinskyPriorPipeline`` from a folder or a cached Hub id.

    ``components`` replace (or, given as None, skip loading) pipeline parts.
    """
    from diffusers import KandinskyPriorPipeline

    return _load(KandinskyPriorPipeline, name, key, torch_dtype, components)


def load_decoder(name: str, key: str = "model.decoder", torch_dtype=None, img2img: bool = False, **components):
    """``KandinskyPipeline`` (or ``KandinskyImg2ImgPipeline``) from a folder or a cached Hub id."""
    from diffusers import KandinskyImg2ImgPipeline, KandinskyPipeline

    cls = KandinskyImg2ImgPipeline if img2img else KandinskyPipeline
    return _load(cls, name, key, torch_dtype, components)


def load_component(name: str, component: str, key: str):
    """One component (``prior``, ``unet``, ``scheduler``...) of a diffusers pipeline folder or a
    cached Hub id, of the diffusers class its model_index.json names, and nothing else."""
    import json

    import diffusers
    import torch

    folder = resolve(name, key)
    entry = json.loads((Path(folder) / "model_index.json").read_text()).get(component)
    if not entry or entry[0] != "diffusers" or not hasattr(diffusers, entry[1]):
        raise PipelineError(f"{folder}: model_index.json names no diffusers {component} ({named(key)}): {entry}")
    cls = getattr(diffusers, entry[1])
    try:
        if issubclass(cls, torch.nn.Module):
            return cls.from_pretrained(folder, subfolder=component, use_safetensors=True, local_files_only=True)
        return cls.from_pretrained(folder, subfolder=component)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot load {cls.__name__} from {component}/ ({named(key)}): "
                            f"{first_line(exc)}") from None


def _load(cls, name: str, key: str, torch_dtype, components: dict):
    folder = resolve(name, key)
    kwargs = dict(components)
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    try:
        pipe = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder}: cannot load {cls.__name__} ({named(key)}): {first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe

