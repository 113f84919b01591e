"""Extract a FashionGen-layout HDF5 file into lossless PNGs and a captions table.

The main process streams the text ``chunk_size`` rows at a time and builds the
table; a pool of ``workers`` processes reads and PNG-encodes the pictures (the CPU
cost), each from its own handle on the file and a few rows at a time, so memory
stays flat however large the file. Everything is written to a temporary folder
beside ``out_dir`` and renamed at the end: a failed run leaves nothing behind.

Usage::

    summary = extract("fashiongen_train.h5", "data/extracted/train", "{name}",
                      chunk_size=256, workers=2)

Output: ``out_dir/images/<row:07d>.png`` and ``out_dir/captions.parquet`` with
columns row, product_id, pose, name, description, category, subcategory,
composition, gender, season, brand, department, caption, image.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from fashiondiff.data.captions import CAPTION_FIELDS, check_template, make_caption
from fashiondiff.data.fashiongen import FashionGen, Rows
from fashiondiff.errors import PipelineError
from fashiondiff.io import atomic_dir

TABLE_FIELDS = ("pose", *CAPTION_FIELDS)
ENCODE_BATCH = 32  # rows per worker task: small enough to balance 2+ workers
PNG_LEVEL = 1  # zlib level: PNG stays lossless; higher levels cost CPU for a few % of disk


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
# Workers open the HDF5 file themselves and read the rows of their own task: only row
# numbers cross process boundaries (pickling pixels through a pipe cost as much as half
# of the PNG encoding at level 1). A ProcessPoolExecutor, not multiprocessing.Pool: when a
# worker dies (OOM killer, kill -9) the executor breaks and every pending result raises,
# where Pool quietly replaces the worker and leaves the lost task's get() waiting forever.

_SOURCE: FashionGen | None = None  # a worker's own handle on the HDF5 file
_BUFFER: np.ndarray | None = None  # a worker's reusable pixel buffer


def _open_source(path: str) -> None:
    """Worker initialiser: every process opens the file itself (HDF5 handles must not cross fork)."""
    global _SOURCE
    _SOURCE = FashionGen(path)


def _save_pngs(folder: str, pixels: np.ndarray, first_row: int, offsets: list[int]) -> int:
    for offset in offsets:
        Image.fromarray(pixels[offset]).save(os.path.join(folder, f"{first_row + offset:07d}.png"),
                                             format="PNG", compress_level=PNG_LEVEL)
    return len(offsets)


def _encode_rows(task: tuple) -> int:
    """Read rows ``start .. stop - 1`` and PNG-encode those at ``offsets``; return the count."""
    global _BUFFER
    folder, start, stop, offsets = task
    n = stop - start
    # the shape too: a process may read files of two sizes, and forked workers inherit the parent's
    if _BUFFER is None or len(_BUFFER) < n or _BUFFER.shape[1:] != _SOURCE.image_shape:
        _BUFFER = np.empty((n, *_SOURCE.image_shape), dtype=np.uint8)
    return _save_pngs(folder, _SOURCE.read_images(start, stop, out=_BUFFER), start, offsets)


class _Encoder:
    """Reading and PNG encoding of pixels in ``workers`` processes (inline with 0).

    At most ``2 x workers`` tasks are in flight, so memory stays flat however large the
    file. A worker's error (a corrupt chunk) is raised here; a worker that died fails
    the stage with one line instead of hanging it.
    """

    def __init__(self, path: Path, workers: int):
        global _SOURCE
        self.workers = workers
        self.pending: deque = deque()
        if workers:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_open_source, initargs=(str(path),))
        else:
            self.pool = None
            _SOURCE = FashionGen(path)

    def submit(self, task: tuple) -> int:
        """Queue one task; return how many images finished meanwhile."""
        if self.pool is None:
            return _encode_rows(task)
        try:
            self.pending.append(self.pool.submit(_encode_rows, task))
        except BrokenProcessPool:  # a worker died after the last result was collected
            raise self._died() from None
        done = 0
        while len(self.pending) > 2 * self.workers:
            done += self._result(self.pending.popleft())
        return done

    def drain(self) -> int:
        done = 0
        while self.pending:
            done += self._result(self.pending.popleft())
        return done

    @staticmethod
    def _died() -> PipelineError:
        return PipelineError("extract: a PNG encoder process died (killed, or out of memory?); "
                             "nothing was written, rerun to start again")

    def _result(self, future) -> int:
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._died() from None

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        global _SOURCE
        if self.pool is not None:
            if exc_type is not None:  # a failed run must not wait for the workers' queued tasks
                for process in list((getattr(self.pool, "_processes", None) or {}).values()):
                    process.kill()
            self.pool.shutdown(wait=True, cancel_futures=True)
        elif _SOURCE is not None:
            _SOURCE.close()
            _SOURCE = None


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
    with _Encoder(data.path, workers) as encoder, \
            tqdm(total=data.n_rows, unit="img", desc=f"extract {data.path.name}",
                 disable=None, leave=False, file=sys.stderr) as bar:
        for start in range(0, data.n_rows, chunk_size):
            rows = data.read(start, start + chunk_size, images=False)
            kept = table.add(rows, template)
            bar.update(len(rows) - len(kept))  # dropped rows count as done
            for i in range(0, len(kept), ENCODE_BATCH):
                offsets = kept[i:i + ENCODE_BATCH]
                first = rows.start + offsets[0]
                task = (str(folder), first, rows.start + offsets[-1] + 1, [o - offsets[0] for o in offsets])
                bar.update(encoder.submit(task))
        bar.update(encoder.drain())
