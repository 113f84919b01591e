"""Disk space, checked before long work: one line naming the shortfall instead of a full disk
hours in.

Usage::

    require("train prior", [Need("checkpoints/prior", 3 * ckpt, "3 checkpoints x 14.7 GB"),
                            Need("models/prior", folder_bytes("models/base/prior"), "the tuned model")],
            hint="free space, or lower train.checkpoints_keep")

Needs on one filesystem add up; each filesystem is checked against its free space (a path that
does not exist yet is measured at its nearest existing parent).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fashiondiff.errors import PipelineError


@dataclass(frozen=True)
class Need:
    path: str | os.PathLike  # where the bytes will be written
    bytes: int
    what: str  # for the message, e.g. "3 checkpoints x 14.7 GB"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def folder_bytes(path: str | os.PathLike) -> int:
    """The bytes of the files under ``path`` (0 if it is not a local folder)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.is_dir() else 0


def checkpoint_bytes(trained: int, ema: bool) -> int:
    """One training checkpoint: fp32 weights and AdamW's two moments of each trained parameter,
    and its EMA copy when there is one."""
    return trained * (4 + 8 + (4 if ema else 0))


def checkpoints_at_peak(keep: int) -> int:
    """Checkpoints on disk at once: the ``keep`` newest, and one more while a save replaces the oldest."""
    return max(1, keep) + 1


def shortfalls(needs: list[Need]) -> list[str]:
    """Per filesystem short of space: what it needs, what it has."""
    by_device: dict[int, list[Need]] = {}
    for need in needs:
        by_device.setdefault(existing(need.path).stat().st_dev, []).append(need)
    out = []
    for group in by_device.values():
        place = existing(group[0].path)
        free, total = shutil.disk_usage(place).free, sum(n.bytes for n in group)
        if total > free:
            parts = ", ".join(f"{n.what} in {n.path}" for n in group)
            out.append(f"needs {gb(total)} on the disk of {place} ({parts}), {gb(free)} free")
    return out


def require(stage: str, needs: list[Need], hint: str) -> None:
    """Stop with one line if a filesystem lacks the space ``needs`` add up to on it."""
    short = shortfalls(needs)
    if short:
        raise PipelineError(f"{stage}: not enough disk: {'; '.join(short)}; {hint}")
