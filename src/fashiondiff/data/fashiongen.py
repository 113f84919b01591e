"""Reader for FashionGen-layout HDF5 files (the real ones or the synthetic ones).

Layout: ``input_image`` uint8 (N, H, W, 3); text keys ``input_name``,
``input_description``, ... as (N, 1) fixed-length byte strings in latin-1;
``input_productID`` (N, 1) int. Only ``input_image`` and ``input_description`` are
required: a missing text key reads as empty strings, a missing product id as the
row index. Every problem is a :class:`PipelineError` naming the file and the key.

Usage::

    with FashionGen("fashiongen_train.h5") as data:
        for rows in data.chunks(256):
            rows.images, rows.text["name"], rows.product_ids
    rows = read_rows("fashiongen_train.h5", 0, 8)   # one-off look at a few rows
"""

from __future__ import annotations

import os
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from fashiondiff.errors import PipelineError, first_line

IMAGE_KEY = "input_image"
ID_KEY = "input_productID"
# Short field name -> HDF5 key, for every text key of the layout.
TEXT_FIELDS = {
    "name": "input_name", "description": "input_description", "category": "input_category",
    "subcategory": "input_subcategory", "pose": "input_pose", "gender": "input_gender",
    "composition": "input_composition", "concat_description": "input_concat_description",
    "department": "input_department", "season": "input_season", "brand": "input_brand",
}
REQUIRED = (IMAGE_KEY, "input_description")
_STRIP = string.whitespace + "\x00"


@dataclass(frozen=True)
class Rows:
    """Rows ``start .. stop - 1`` of a file: pictures, product ids and decoded text fields."""

    start: int
    stop: int
    images: np.ndarray | None  # (n, H, W, 3) uint8, or None when not asked for
    product_ids: np.ndarray  # (n,) int64
    text: dict[str, list[str]]  # short field name ("name", "pose", ...) -> n strings

    def __len__(self) -> int:
        return self.stop - self.start


def decode(values: np.ndarray) -> list[str]:
    """Latin-1 byte strings (FashionGen's encoding, not UTF-8) -> clean str."""
    out = []
    for value in values.ravel():
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        out.append(str(value).strip(_STRIP))
    return out


class FashionGen:
    """An open, validated FashionGen-layout file; read it by row range or in chunks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = _open(self.path)
        try:
            self._validate()
        except BaseException:
            self._file.close()
            raise

    # -- validation --------------------------------------------------------------
    def _fail(self, message: str) -> PipelineError:
        return PipelineError(f"{self.path}: {message}")

    def _validate(self) -> None:
        f = self._file
        for key in REQUIRED:
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise self._fail(f"missing required key '{key}'")
        images = f[IMAGE_KEY]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise self._fail(f"key '{IMAGE_KEY}' must be uint8 (N, H, W, 3), "
                             f"got {images.dtype} {images.shape}")
        self.n_rows = int(images.shape[0])
        if self.n_rows == 0:
            raise self._fail(f"empty file: '{IMAGE_KEY}' has 0 rows")
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self._text = {}
        for field, key in TEXT_FIELDS.items():
            if key in f:
                self._text[field] = self._column(key, string_kind=True)
        self.missing = tuple(key for key in TEXT_FIELDS.values() if key not in f)
        self._ids = self._column(ID_KEY, string_kind=False) if ID_KEY in f else None
        if self._ids is None:
            print(f"warning: {self.path}: no '{ID_KEY}' key; using the row index as product id",
                  file=sys.stderr)
        self._images = images
        for key in (IMAGE_KEY, ID_KEY, *TEXT_FIELDS.values()):
            if key in f:
                self._check_not_truncated(key)

    def _column(self, key: str, string_kind: bool) -> h5py.Dataset:
        ds = self._file[key]
        if not isinstance(ds, h5py.Dataset):
            raise self._fail(f"key '{key}' is not a dataset")
        if ds.shape[:1] != (self.n_rows,) or ds.shape[1:] not in ((), (1,)):
            raise self._fail(f"key '{key}' has shape {ds.shape}, expected ({self.n_rows}, 1) "
                             f"like '{IMAGE_KEY}'")
        is_string = ds.dtype.kind == "S" or h5py.check_string_dtype(ds.dtype) is not None
        if string_kind and not is_string:
            raise self._fail(f"key '{key}' must hold byte strings, got {ds.dtype}")
        if not string_kind and ds.dtype.kind not in "iu":
            raise self._fail(f"key '{key}' must hold integers, got {ds.dtype}")
        return ds

    def _check_not_truncated(self, key: str) -> None:
        """Contiguous data past the end of the file: catch it now, before any output."""
        ds = self._file[key]
        offset = ds.id.get_offset()
        if offset is not None and offset + ds.id.get_storage_size() > self._file_size:
            raise self._fail(f"truncated file: data of key '{key}' runs past the end of the file")

    @property
    def _file_size(self) -> int:
        return self.path.stat().st_size

    # -- reading -------------------------------------------------------------------
    def read(self, start: int, stop: int, images: bool = True) -> Rows:
        """Rows ``start .. stop - 1`` (clipped to the file)."""
        start, stop = max(0, start), min(stop, self.n_rows)
        n = max(0, stop - start)
        text = {}
        for field in TEXT_FIELDS:
            ds = self._text.get(field)
            text[field] = decode(self._slice(ds, start, stop)) if ds is not None else [""] * n
        if self._ids is not None:
            ids = self._slice(self._ids, start, stop).ravel().astype(np.int64)
        else:
            ids = np.arange(start, stop, dtype=np.int64)
        pixels = self._slice(self._images, start, stop) if images else None
        return Rows(start, start + n, pixels, ids, text)

    def read_images(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Pictures of rows ``start .. stop - 1`` read straight into ``out[:n]``; returns that view.

        ``out`` is a C-contiguous uint8 (>= n, H, W, 3) buffer the caller reuses, so
        streaming a large file allocates (and page-faults) nothing per chunk.
        """
        start, stop = max(0, start), min(stop, self.n_rows)
        n = max(0, stop - start)
        if n:
            self._slice(self._images, start, stop, out=out)
        return out[:n]

    def _slice(self, ds: h5py.Dataset, start: int, stop: int,
               out: np.ndarray | None = None) -> np.ndarray:
        try:
            if out is None:
                return ds[start:stop]
            ds.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])
            return out
        except (OSError, ValueError, RuntimeError) as exc:
            raise self._fail(f"rows {start}-{stop - 1} of key '{ds.name.lstrip('/')}' "
                             f"unreadable, truncated or corrupt file ({first_line(exc)})") from None

    def chunks(self, chunk_size: int, images: bool = True) -> Iterator[Rows]:
        """Every row, ``chunk_size`` at a time; never the whole dataset in memory."""
        if chunk_size < 1:
            raise PipelineError(f"chunk size must be >= 1, got {chunk_size}")
        for start in range(0, self.n_rows, chunk_size):
            yield self.read(start, start + chunk_size, images=images)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FashionGen:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise PipelineError(f"{path}: not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise PipelineError(f"{path}: truncated or corrupt HDF5 file ({first_line(exc, 'unreadable')})") from None


def read_rows(path: str | os.PathLike, start: int, stop: int, images: bool = True) -> Rows:
    """Open ``path``, validate it and return rows ``start .. stop - 1``."""
    with FashionGen(path) as data:
        return data.read(start, stop, images=images)
