"""Read a finished embedding cache (the training stages' only view of the frozen encoders).

Usage::

    cache = open_cache("data/cache/train", expect=cache_identity(...))
    batch = cache.fetch(index, ("image_embeds", "text_hidden", "text_mask"))   # per-image NumPy arrays

The layout is ``fashiondiff.cache.format``'s; ``fashiondiff.embed.writer`` writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashiondiff.cache.format import CAPTION_ARRAYS, FIELDS, FORMAT_VERSION, IMAGE_ARRAYS, TEXT_LENGTH
from fashiondiff.errors import PipelineError


@dataclass
class Cache:
    """A finished cache, arrays memory-mapped (``arrays``: every stored array by name)."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """CLIP tokens of each unique caption (its attention mask's length)."""
        return np.diff(self.arrays["text_offsets"])

    def fetch(self, index: np.ndarray, names=FIELDS) -> dict[str, np.ndarray]:
        """The images at ``index`` in the per-image layout training uses: every caption array
        repeated per image, CLIP hidden states zero-padded back to 77 positions (the prior masks
        them: see the module doc) and ``text_mask`` rebuilt from the lengths."""
        index = np.asarray(index)
        a = self.arrays
        captions = np.asarray(a["caption"][index], dtype=np.int64)
        unique, inverse = np.unique(captions, return_inverse=True)  # read shared captions once
        out = {}
        for name in names:
            if name in IMAGE_ARRAYS:
                out[name] = np.asarray(a[name][index])
            elif name in CAPTION_ARRAYS:
                out[name] = np.asarray(a[name][unique])[inverse]
            elif name == "text_mask":
                out[name] = np.arange(TEXT_LENGTH) < self.lengths[captions][:, None]
            elif name == "text_hidden":
                offsets, flat = a["text_offsets"], a["text_hidden"]
                padded = np.zeros((len(unique), TEXT_LENGTH, flat.shape[1]), dtype=flat.dtype)
                for j, c in enumerate(unique):
                    lo, hi = offsets[c], offsets[c + 1]
                    padded[j, : hi - lo] = flat[lo:hi]
                out[name] = padded[inverse]
            else:
                raise KeyError(f"{name}: not a cached field ({', '.join(FIELDS)})")
        return out


def open_cache(path: str | Path, expect: dict | None = None) -> Cache:
    """Open a finished cache; fail clearly if it was made by other models or preprocessing."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise PipelineError(f"{path}: not a finished embedding cache (no meta.json): run `dvc repro embed`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise PipelineError(
            f"{path}: cache format {meta.get('format')} (one text row per image) is not format "
            f"{FORMAT_VERSION} (one per unique caption, compact CLIP text): re-run the embed stage "
            f"(`dvc repro embed`)"
        )
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise PipelineError(
                f"{path}: cache made with {key}={meta.get(key)!r}, but this run uses {key}={want!r}: "
                f"re-run the embed stage"
            )
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    uncond = {f.stem[len("uncond_") :]: np.load(f) for f in sorted(path.glob("uncond_*.npy"))}
    return Cache(path=path, meta=meta, arrays=arrays, uncond=uncond, rows=np.load(path / "rows.npy"))
