"""What a run will take before it starts: steps per model, GPU hours from measured rates
(labelled as the extrapolation they are), and disk against the free space. ``fashiondiff run
PRESET --dry`` prints it beside DVC's list of stages.

Usage::

    plan = make_plan(params)          # a validated Params (a preset applied)
    print(plan.text())

Every figure says where it comes from:

* rows and held-out rows are read from the data files (their product ids, the split's own
  hash), steps are the training loop's arithmetic (the last partial batch of an epoch dropped);
* hours are steps x the seconds per step that ``bench/bench_gpu_train.py`` measured for the
  full-size networks (``reports/gpu_train.json``: device, torch, batch), scaled by
  ``batch_size`` / the measured batch; they leave out data loading, checkpoints, validation,
  ``embed`` and ``evaluate``, and hold for Kandinsky 2.1 at 256 px only;
* disk: the data files' sizes, PNG bytes per image measured by encoding each file's first
  rows as ``extract`` does, the cache's bytes per image measured by bench/bench_cache.py (50 KiB
  in float16 at full size), checkpoints from the base folders' parameter counts
  (safetensors headers: 16 bytes per trained parameter with EMA, 12 without), the tuned
  folders as large as the base ones, and DVC's cache holding a copy of every output.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashiondiff.batching import split_batch
from fashiondiff.disk import checkpoint_bytes, checkpoints_at_peak, existing, folder_bytes, gb
from fashiondiff.errors import PipelineError

RATES_FILE = Path("reports/gpu_train.json")  # bench/bench_gpu_train.py's measurement, committed
CACHE_BYTES_FP16 = 50 * 1024  # per image, full size, float16 (bench/bench_cache.py; format 2)
SAMPLE_ROWS = 16  # rows per data file encoded as PNG to measure extract's bytes per image
MODEL_PARTS = {"prior": "prior", "decoder": "unet"}  # the subfolder that training changes


@dataclass
class Plan:
    lines: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)  # disk shortfalls

    def text(self) -> str:
        return "\n".join(self.lines)


def processes(launcher: str) -> int:
    """The process count a ``compute.launcher`` asks for (``--num_processes N``), else 1."""
    match = re.search(r"--num[_-]processes[= ](\d+)", launcher)
    return int(match[1]) if match else 1


@functools.cache
def rows_of(path: str, fraction: float, seed: int) -> tuple[int, int]:
    """(rows, held-out rows) of a FashionGen-layout file, the split's own rule."""
    import h5py

    from fashiondiff.data.split import heldout_mask

    with h5py.File(path, "r") as f:
        n = len(f["input_image"])
        ids = f["input_productID"][:].reshape(-1) if "input_productID" in f else np.arange(n)
    return n, int(heldout_mask(ids, fraction, seed).sum())


@functools.cache
def png_bytes_per_row(path: str) -> float:
    """Mean PNG size of the file's first rows, encoded as ``extract`` writes them."""
    import h5py
    from PIL import Image

    with h5py.File(path, "r") as f:
        images = f["input_image"][:SAMPLE_ROWS]
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        sizes.append(buffer.tell())
    return float(np.mean(sizes)) if sizes else 0.0


def parameters(folder: Path) -> int:
    """Parameters in a diffusers model folder's safetensors files, from their headers alone."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def measured_rates(root: Path) -> tuple[dict[str, float], str, int]:
    """Seconds per full fine-tuning step per model, the measurement's label, its batch size."""
    path = root / RATES_FILE
    if not path.is_file():
        return {}, "", 0
    data = json.loads(path.read_text())
    rates = {r["model"]: r["seconds_per_step"] for r in data["results"] if r["mode"] == "full"}
    batch = next(r["batch_size"] for r in data["results"] if r["mode"] == "full")
    return rates, f"{data['device']}, torch {data['torch']}", batch


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 0.1 else f"{60 * h:.1f} min"


def make_plan(params, root: Path = Path(".")) -> Plan:
    plan = Plan()
    files = params.data.files
    fraction, seed = params.data.holdout_fraction, params.seed
    named = {"train": files.train, "validation": files.validation, "generic": files.generic}
    missing = [f"{k} {v}" for k, v in named.items() if v and not (root / v).is_file()]
    if missing:
        raise PipelineError(f"plan: data file not found: {', '.join(missing)} (data.files)")
    n_train, held_train = rows_of(str(root / files.train), fraction, seed)
    train_rows = n_train - held_train if fraction else n_train
    world, accumulation = processes(params.compute.launcher), params.train.gradient_accumulation_steps
    per_process = split_batch(params.batch_size, world, accumulation)
    per_epoch = train_rows // params.batch_size  # optimiser steps; the last partial batch is dropped
    steps = per_epoch * params.epochs
    split = "one process" if world == 1 else f"{per_process * accumulation} per process x {world} processes"
    if accumulation > 1:
        split += f", {accumulation} micro-batches of {per_process} each"
    plan.lines.append(
        f"data: {train_rows:,} training images of {n_train:,} in {files.train}"
        + (f" ({held_train:,} held out: data.holdout_fraction {fraction})" if fraction else "")
    )
    plan.lines.append(
        f"steps: {steps:,} per model ({params.epochs} epochs x {per_epoch:,} steps of {params.batch_size}: {split})"
    )
    rates, measured_on, batch = measured_rates(root)
    if rates:
        scale = per_process * accumulation / batch  # one process's samples per step
        hours = {m: steps * rates[m] * scale / 3600 for m in ("prior", "decoder")}
        plan.lines.append(
            f"hours, extrapolated (if the models are Kandinsky 2.1 at 256 px): prior {_hours(hours['prior'])}, "
            f"decoder {_hours(hours['decoder'])}: steps x the s/step that bench/bench_gpu_train.py measured on "
            f"{measured_on}, batch {batch} ({RATES_FILE}); left out: data loading, checkpoints, validation, "
            f"embed, evaluate"
        )

    needs: list[tuple[str, int, str]] = []
    extracted = 0
    for path in named.values():
        if not path:
            continue
        rows = n_train if path == files.train else rows_of(str(root / path), 0.0, seed)[0]
        extracted += int(rows * png_bytes_per_row(str(root / path)))
    needs.append(("data/extracted", extracted, f"PNGs (bytes measured on each file's first {SAMPLE_ROWS} rows)"))
    n_val, held_val = rows_of(str(root / files.validation), fraction, seed)
    cache_rows = train_rows + (held_val if fraction else n_val)
    per_row = CACHE_BYTES_FP16 * (2 if params.embed.dtype == "float32" else 1)
    needs.append(
        ("data/cache", cache_rows * per_row, f"embedding cache, {gb(per_row)} per image ({params.embed.dtype})")
    )
    keep = checkpoints_at_peak(params.train.checkpoints_keep)
    for kind, sub in MODEL_PARTS.items():
        base = root / getattr(params.model, kind)
        trained = parameters(base / sub)
        needs.append(
            (
                f"checkpoints/{kind}",
                keep * checkpoint_bytes(trained, ema=params.train.ema_decay > 0),
                f"{keep} checkpoints of {trained / 1e6:,.1f} M parameters",
            )
        )
        needs.append((f"models/{kind}", folder_bytes(base), "tuned model (the base folder's size)"))
    outputs = sum(b for p, b, _ in needs if not p.startswith("checkpoints"))
    needs.append((".dvc/cache", outputs, "DVC's copy of those outputs (none with linked cache.type)"))
    total = sum(b for _, b, _ in needs)
    free = shutil.disk_usage(existing(root)).free
    plan.lines.append("disk, estimated (beside the data files, which are there):")
    plan.lines += [f"  {p:<20} {gb(b):>9}  {what}" for p, b, what in needs]
    plan.lines.append(
        f"  {'total':<20} {gb(total):>9}  against {gb(free)} free at {existing(root).resolve()}"
        + ("" if free >= total else f": SHORT by {gb(total - free)}")
    )
    if free < total:
        plan.short.append(f"needs {gb(total)}, {gb(free)} free")
    return plan
