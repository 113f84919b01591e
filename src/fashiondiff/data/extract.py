"""Extract a FashionGen-layout HDF5 file into lossless PNGs and a captions table.

The main process streams the file ``chunk_size`` rows at a time and builds the
table; a pool of ``workers`` processes PNG-encodes the pictures (the CPU cost),
reading the raw pixels from a bounded ring of shared-memory slots, so memory stays
flat however large the file. Everything is written to a temporary folder
beside ``out_dir`` and renamed at the end: a failed run leaves nothing behind.

Usage::

    summary = extract("fashiongen_train.h5", "data/extracted/train", "{name}",
                      chunk_size=256, workers=2)

Output: ``out_dir/images/<row:07d>.png`` and ``out_dir/captions.parquet`` with
columns row, product_id, pose, name, description, category, subcategory,
composition, gender, season, brand, department, caption, image.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import re
import string
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fashiondiff.data.fashiongen import FashionGen, Rows
from fashiondiff.errors import PipelineError
from fashiondiff.io import atomic_dir

CAPTION_FIELDS = ("name", "description", "category", "subcategory", "composition", "gender",
                  "season", "brand", "department")
TABLE_FIELDS = ("pose", *CAPTION_FIELDS)
ENCODE_BATCH = 32  # rows per worker task: small enough to balance 2+ workers
PNG_LEVEL = 1  # zlib level: PNG stays lossless; higher levels cost CPU for a few % of disk
_SEPARATORS = re.compile(r"\s*([,;:.])(?:\s*[,;:.])+")  # "a, , b" -> "a, b" (empty fields)


# --- captions -------------------------------------------------------------------------

def check_template(template: str) -> None:
    """Fail with the params key's name if ``template`` uses anything but known fields."""
    known = ", ".join(CAPTION_FIELDS)
    try:
        parsed = list(string.Formatter().parse(template))
        for _, field, _, _ in parsed:
            if field is not None and field not in CAPTION_FIELDS:
                raise PipelineError(f"params: data.caption: unknown field '{{{field}}}' in "
                                    f"{template!r} (known: {known})")
        template.format_map(dict.fromkeys(CAPTION_FIELDS, ""))
    except ValueError as exc:
        raise PipelineError(f"params: data.caption: bad template {template!r} ({exc})") from None


def clean(text: str) -> str:
    """One line, single spaces, no separators left dangling by empty fields; "" if no words."""
    text = _SEPARATORS.sub(r"\1", " ".join(text.split()))
    text = text.lstrip(" .,;:-|/").rstrip(" ,;:-|/")
    return text if any(c.isalnum() for c in text) else ""


def make_caption(template: str, fields: dict[str, str]) -> str:
    """The template filled from ``fields``; falls back to the name, then the description."""
    return (clean(template.format_map(fields)) or clean(fields.get("name", ""))
            or clean(fields.get("description", "")))


class _Table:
    """The captions table, built column by column as chunks stream past."""

    def __init__(self) -> None:
        self.columns: dict[str, list] = {k: [] for k in ("row", "product_id", *TABLE_FIELDS,
                                                         "caption", "image")}
        self.dropped = 0

    def add(self, rows: Rows, template: str) -> list[int]:
        """Append the rows that have a caption; return their offsets within ``rows``."""
        kept = []
        for i in range(len(rows)):
            fields = {f: rows.text[f][i] for f in CAPTION_FIELDS}
            caption = make_caption(template, fields)
            if not caption:
                self.dropped += 1
                continue
            row = rows.start + i
            self.columns["row"].append(row)
            self.columns["product_id"].append(int(rows.product_ids[i]))
            for f in TABLE_FIELDS:
                self.columns[f].append(rows.text[f][i])
            self.columns["caption"].append(caption)
            self.columns["image"].append(f"images/{row:07d}.png")
            kept.append(i)
        return kept

    def write(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {"row": pa.int64(), "product_id": pa.int64()}
        table = pa.table({k: pa.array(v, type=types.get(k, pa.string()))
                          for k, v in self.columns.items()})
        pq.write_table(table, path)


# --- PNG encoding -------------------------------------------------------------------
# Pixels travel through a ring of chunk-sized slots in anonymous shared memory that the
# forked workers inherit: the main process reads the HDF5 file straight into a free
# slot and sends only (slot, rows) to a worker. Pickling the pixels through a pipe
# instead costs ~5 extra copies and page faults per image, as much as half of the
# PNG encoding itself at level 1, and would eat most of the speed-up on 2 cores.

_RING: np.ndarray | None = None  # a worker's view of the shared slots


def _init_worker(buffer: mmap.mmap, shape: tuple) -> None:
    global _RING
    _RING = np.ndarray(shape, dtype=np.uint8, buffer=buffer)


def _save_pngs(folder: str, pixels: np.ndarray, first_row: int, offsets: list[int]) -> int:
    for offset in offsets:
        Image.fromarray(pixels[offset]).save(os.path.join(folder, f"{first_row + offset:07d}.png"),
                                             format="PNG", compress_level=PNG_LEVEL)
    return len(offsets)


def _encode_task(task: tuple) -> tuple[int, int]:
    """Worker: PNG-encode some rows of one slot; return (slot, images written)."""
    folder, slot, first_row, offsets = task
    return slot, _save_pngs(folder, _RING[slot], first_row, offsets)


class _Encoder:
    """PNG encoding in ``workers`` processes (inline with 0), over a ring of 3 chunk slots.

    At most 3 chunks of pixels exist at once, however large the file: the main
    process fills one slot while the workers encode the others. ``apply_async``
    and a queue, not ``Pool.imap``: imap's feeder thread drains its input as fast as
    it can, so bounding it would need a semaphore across threads, which can hang
    ``terminate()`` on error.
    """

    def __init__(self, folder: Path, workers: int, chunk_rows: int, image_shape: tuple):
        self.folder = str(folder)
        self.slots = 3 if workers else 1
        shape = (self.slots, chunk_rows, *image_shape)
        self.pool = None
        if workers:
            self.buffer = mmap.mmap(-1, math.prod(shape))  # MAP_SHARED: inherited by fork
            self.ring = np.ndarray(shape, dtype=np.uint8, buffer=self.buffer)
            self.pool = multiprocessing.get_context("fork").Pool(
                workers, initializer=_init_worker, initargs=(self.buffer, shape))
        else:
            self.ring = np.empty(shape, dtype=np.uint8)
        self.free = deque(range(self.slots))
        self.tasks_left = [0] * self.slots
        self.pending: deque = deque()
        self.finished = 0  # images written and not yet reported by take_finished()

    def acquire(self) -> tuple[int, np.ndarray]:
        """A free slot (waiting for the oldest work if none is): its index and buffer."""
        while not self.free:
            self._wait_one()
        slot = self.free.popleft()
        return slot, self.ring[slot]

    def submit(self, slot: int, first_row: int, offsets: list[int]) -> None:
        """Encode rows ``first_row + offsets`` of ``slot``; the slot is freed when done."""
        if self.pool is None:
            self.finished += _save_pngs(self.folder, self.ring[slot], first_row, offsets)
            self.free.append(slot)
            return
        for i in range(0, len(offsets), ENCODE_BATCH):
            task = (self.folder, slot, first_row, offsets[i:i + ENCODE_BATCH])
            self.pending.append(self.pool.apply_async(_encode_task, (task,)))
            self.tasks_left[slot] += 1
        if not self.tasks_left[slot]:
            self.free.append(slot)

    def _wait_one(self) -> None:
        slot, written = self.pending.popleft().get()
        self.finished += written
        self.tasks_left[slot] -= 1
        if not self.tasks_left[slot]:
            self.free.append(slot)

    def drain(self) -> None:
        while self.pending:
            self._wait_one()

    def take_finished(self) -> int:
        done, self.finished = self.finished, 0
        return done

    def __enter__(self) -> "_Encoder":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


# --- the stage function -------------------------------------------------------------

def extract(h5_path: str | os.PathLike, out_dir: str | os.PathLike, caption_template: str,
            chunk_size: int, workers: int) -> dict:
    """Write ``out_dir/images/*.png`` and ``out_dir/captions.parquet``; return a summary.

    Rows whose caption (then name, then description) is blank are dropped and counted.
    """
    check_template(caption_template)
    if chunk_size < 1:
        raise PipelineError(f"params: data.chunk_size must be >= 1, got {chunk_size}")
    if workers < 0:
        raise PipelineError(f"params: data.workers must be >= 0, got {workers}")
    began = time.perf_counter()
    out_dir = Path(out_dir)
    with FashionGen(h5_path) as data, atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        table = _Table()
        try:
            _stream(data, table, caption_template, tmp / "images", chunk_size, workers)
        except OSError as exc:
            raise PipelineError(f"{out_dir}: cannot write the extracted images ({exc})") from None
        table.write(tmp / "captions.parquet")
    seconds = time.perf_counter() - began
    kept = len(table.columns["row"])
    summary = {"rows": kept, "products": len(set(table.columns["product_id"])),
               "dropped": table.dropped, "seconds": round(seconds, 3),
               "images_per_s": round(kept / seconds, 1)}
    print(f"extract {data.path.name}: {summary['rows']} rows, {summary['products']} products, "
          f"{summary['dropped']} dropped, {seconds:.1f} s ({summary['images_per_s']:.0f} rows/s)")
    return summary


def _stream(data: FashionGen, table: _Table, template: str, folder: Path,
            chunk_size: int, workers: int) -> None:
    with _Encoder(folder, workers, chunk_size, data.image_shape) as encoder, \
            tqdm(total=data.n_rows, unit="img", desc=f"extract {data.path.name}",
                 disable=None, leave=False, file=sys.stderr) as bar:
        for start in range(0, data.n_rows, chunk_size):
            rows = data.read(start, start + chunk_size, images=False)
            kept = table.add(rows, template)
            bar.update(len(rows) - len(kept))  # dropped rows count as done
            if kept:
                slot, pixels = encoder.acquire()
                data.read_images(rows.start, rows.stop, out=pixels)
                encoder.submit(slot, rows.start, kept)
            bar.update(encoder.take_finished())
        encoder.drain()
        bar.update(encoder.take_finished())
