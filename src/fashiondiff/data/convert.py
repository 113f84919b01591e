"""Convert a shop's catalogue (a folder of photos and a captions file) into one FashionGen-layout
HDF5 file, the only layout the pipeline reads (:mod:`fashiondiff.data.fashiongen`).

The captions file, told apart by its extension:

* ``.csv``: a header row, then one row per photo. Columns ``file`` and ``caption``, optionally
  ``name``, ``category``, ``product_id`` (names matched ignoring case and spaces; others ignored).
* ``.jsonl``: one JSON object per line with the same keys.
* ``.json``: COCO captions: ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``,
  ``caption``). An image takes its first caption in annotation order; the others are ignored.

``file`` is relative to the images folder. Where each field goes: ``caption`` ->
``input_description``, and ``input_name`` too unless the row has a ``name`` (the pipeline's
caption template, ``data.caption``, reads ``{name}`` by default); ``category`` ->
``input_category``; the other text keys are empty. ``product_id`` is an integer; a row without
one is a product of its own, its id a hash of its file path (:func:`own_product_id`), so adding
or removing other rows never moves it across the held-out split (``data.holdout_fraction``).

Text is written in latin-1, FashionGen's encoding (:func:`to_latin1`): after NFC, typographic
dashes and quotes become ASCII ones, any other character outside latin-1 its NFKD letters
(ő -> o, ﬁ -> fi, … -> ...), and one with none '?'. Pictures follow one rule,
:func:`fashiongen_pixels`: 256 x 256 RGB, the photo whole, centred on white.

Bad rows are skipped, never silently: a row that cannot be read, has no file name, an empty
caption, a product_id that is not an integer, a file an earlier row already has (a duplicate),
a missing file, or an image Pillow cannot decode (corrupt, truncated). They are printed in one
summary at the end, each named by the captions file and its line (the line an editor or a
spreadsheet shows, the header being line 1; COCO: the image's place in ``images``), at most
:data:`REPORT_LINES` of them, and all of them written to ``OUT.skipped.csv``. No good row: a
PipelineError and no output.

Memory stays bounded: the captions' text is held, pictures only a few batches at a time, written
to a resizable dataset as they come. The file is written beside ``out`` and renamed
(:func:`fashiondiff.io.atomic_file`); the same inputs give the same bytes.

Usage::

    done = convert("shop/photos", "shop/captions.csv", "data/raw/shop.h5", workers=2)
    done.rows, done.products, done.skipped
    pixels = fashiongen_pixels(Image.open("photo.jpg"))        # (256, 256, 3) uint8
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import sys
import time
import unicodedata
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from fashiondiff.data.captions import clean
from fashiondiff.data.fashiongen import ID_KEY, IMAGE_KEY, TEXT_FIELDS
from fashiondiff.errors import PipelineError, first_line
from fashiondiff.io import atomic_file
from fashiondiff.spread import raise_if_stopped

SIZE = 256  # FashionGen's pictures are 256 x 256
WHITE = (255, 255, 255)  # FashionGen's photos are product shots on white
COLUMNS = ("file", "caption", "name", "category", "product_id")
REQUIRED = ("file", "caption")
BATCH = 16  # pictures per worker task
REPORT_LINES = 20
TYPOGRAPHIC = str.maketrans(
    {
        "‘": "'",
        "’": "'",
        "‚": "'",
        "‛": "'",
        "“": '"',
        "”": '"',
        "„": '"',
        "‐": "-",
        "‑": "-",
        "‒": "-",
        "–": "-",
        "—": "-",
        "―": "-",
        "−": "-",
    }
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the captions file, as text. ``problem``: (kind, detail) if it cannot be read."""

    where: str  # "line 8" (CSV, JSON Lines) or "image 3 (id 17)" (COCO)
    file: str = ""
    caption: str = ""
    name: str = ""
    category: str = ""
    product_id: str = ""
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class Skip:
    """A row left out, and why."""

    index: int  # among the captions file's rows, for the report's order
    where: str
    file: str
    kind: str  # "missing file", "empty caption", ...: what the report counts
    detail: str = ""

    @property
    def reason(self) -> str:
        return f"{self.kind} {self.detail}".strip()


@dataclass(frozen=True, slots=True)
class _Row:
    """A row that passed the text checks: what its image and the HDF5 text keys need."""

    index: int
    entry: Entry
    path: str
    product_id: int


@dataclass(frozen=True)
class Converted:
    """What :func:`convert` wrote."""

    out: Path
    rows: int
    products: int
    skipped: tuple[Skip, ...]
    skipped_list: Path | None  # the full list of skipped rows, when there are any
    replaced: int  # rows whose text had characters outside latin-1 (see to_latin1)
    seconds: float


# --- the captions file -------------------------------------------------------------------------


def _utf8_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"{path} line {number}: not UTF-8 (byte 0x{raw[exc.start]:02x} at "
                    f"column {exc.start + 1}): save it as UTF-8 (a spreadsheet's "
                    f'"CSV UTF-8")'
                ) from None


def _entry(where: str, fields: dict) -> Entry:
    values = {str(k).strip().lower(): v for k, v in fields.items()}
    return Entry(where, **{c: "" if values.get(c) is None else str(values[c]).strip() for c in COLUMNS})


def _read_csv(path: Path) -> list[Entry]:
    records = csv.reader(_utf8_lines(path))
    try:
        header = [h.strip().lower() for h in next(records, [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise PipelineError(
                f"{path}: CSV header ({', '.join(header) or 'empty'}) lacks "
                f"{', '.join(missing)}: expected file, caption and optionally "
                f"name, category, product_id"
            )
        entries, last_line = [], records.line_num
        for cells in records:
            where, last_line = f"line {last_line + 1}", records.line_num
            if not cells:
                continue
            if len(cells) > len(header):
                detail = f"({len(cells)} cells, the header {len(header)}: quote a caption with a comma)"
                entries.append(Entry(where, cells[0].strip(), problem=("bad row", detail)))
                continue
            entries.append(_entry(where, dict(zip(header, cells))))
    except csv.Error as exc:
        raise PipelineError(f"{path} line {records.line_num}: not CSV ({exc})") from None
    return entries


def _read_jsonl(path: Path) -> list[Entry]:
    entries = []
    for number, line in enumerate(_utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            entries.append(Entry(f"line {number}", problem=("bad row", f"(not JSON: {exc.msg})")))
            continue
        if not isinstance(fields, dict):
            entries.append(Entry(f"line {number}", problem=("bad row", "(not a JSON object)")))
            continue
        entries.append(_entry(f"line {number}", fields))
    return entries


def _read_coco(path: Path) -> list[Entry]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(
            f"{path}: not JSON ({exc}); a .json captions file is read as COCO "
            f"captions, a .jsonl one as one object per line"
        ) from None
    if not (
        isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list)
    ):
        raise PipelineError(
            f"{path}: not COCO captions: expected an object with 'images' and "
            f"'annotations' lists (for one object per line, name the file .jsonl)"
        )
    captions: dict = {}
    for note in data["annotations"]:
        if isinstance(note, dict) and note.get("image_id") is not None:
            captions.setdefault(note["image_id"], note.get("caption"))  # the first caption wins
    entries = []
    for number, image in enumerate(data["images"], 1):
        if not isinstance(image, dict):
            entries.append(Entry(f"image {number}", problem=("bad row", "(not a JSON object)")))
            continue
        where = f"image {number} (id {image.get('id')})"
        if image.get("id") not in captions:
            detail = f"(no annotation has image_id {image.get('id')})"
            entries.append(Entry(where, str(image.get("file_name") or ""), problem=("empty caption", detail)))
            continue
        entries.append(_entry(where, {"file": image.get("file_name"), "caption": captions[image["id"]]}))
    return entries


READERS: dict[str, Callable[[Path], list[Entry]]] = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_coco}


def read_captions(path: str | os.PathLike) -> list[Entry]:
    """The rows of a captions file, in order; the format by its extension (:data:`READERS`)."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PipelineError(
            f"{path}: unknown captions format '{path.suffix}': give a .csv, a .jsonl "
            f"(JSON Lines) or a .json (COCO captions) file"
        )
    if not path.is_file():
        raise PipelineError(f"{path}: no such captions file")
    return reader(path)


# --- text and ids ------------------------------------------------------------------------------


def to_latin1(text: str) -> str:
    """``text`` in latin-1's characters: NFC, typographic dashes and quotes made ASCII, any other
    character outside latin-1 replaced by its NFKD letters (accents dropped), or '?' if none."""
    text = unicodedata.normalize("NFC", text).translate(TYPOGRAPHIC)
    if all(ord(c) < 256 for c in text):
        return text
    out = []
    for c in text:
        if ord(c) < 256:
            out.append(c)
        elif not unicodedata.combining(c):  # an accent NFC left alone is dropped, as NFKD's are
            letters = [p for p in unicodedata.normalize("NFKD", c) if not unicodedata.combining(p)]
            out.append("".join(p if ord(p) < 256 else "?" for p in letters) or "?")
    return "".join(out)


def own_product_id(file: str) -> int:
    """The product id of a row without one: a hash of its normalised file path, stable whatever
    other rows the catalogue has."""
    digest = hashlib.blake2b(os.path.normpath(file).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: a non-negative int64


def _product_id(text: str) -> int | None:
    """``"123"`` or a spreadsheet's ``"123.0"`` -> 123; None if not an integer an int64 holds."""
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            return None
        if not number.is_integer():
            return None
        value = int(number)
    return value if -(2**63) <= value < 2**63 else None


def _text_problem(entry: Entry, product_id: int | None, first: dict[str, str], images: Path) -> tuple[str, str] | None:
    """(kind, detail) of the first check ``entry`` fails that needs no decoding, or None."""
    if entry.problem:
        return entry.problem
    if not entry.file:
        return "no file name", ""
    if not clean(entry.caption):
        return "empty caption", ""
    if product_id is None:
        return "bad product_id", f"{entry.product_id!r} (not an integer)"
    if os.path.normpath(entry.file) in first:
        return "duplicate file", f"{entry.file} (first at {first[os.path.normpath(entry.file)]})"
    if not (images / entry.file).is_file():
        return "missing file", entry.file
    return None


def _check_text(entries: list[Entry], images: Path) -> tuple[list[_Row], list[Skip]]:
    """Every check that needs no decoding, row by row, in order. A duplicate is a file that an
    earlier row passing these checks already has: a row skipped for its caption claims no file."""
    rows: list[_Row] = []
    skips: list[Skip] = []
    first: dict[str, str] = {}  # normalised file path -> where it first came
    for index, entry in enumerate(entries):
        product_id = _product_id(entry.product_id) if entry.product_id else own_product_id(entry.file)
        problem = _text_problem(entry, product_id, first, images)
        if problem is not None:
            skips.append(Skip(index, entry.where, entry.file, *problem))
            continue
        first.setdefault(os.path.normpath(entry.file), entry.where)
        rows.append(_Row(index, entry, str(images / entry.file), product_id))
    return rows, skips


# --- pictures ----------------------------------------------------------------------------------


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey (I;16*, I, F) scaled to 8 bits: Pillow's convert would clip at 255."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return Image.fromarray(np.clip(np.round(np.asarray(image) / 257), 0, 255).astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8))
    return image


def fashiongen_pixels(image: Image.Image) -> np.ndarray:
    """The one rule for every picture: EXIF orientation applied; 16-bit grey scaled to 8 bits;
    transparency composited onto white; RGB (CMYK naively, embedded colour profiles ignored);
    the longer side scaled to 256 (LANCZOS, aspect kept, small pictures enlarged); centred on a
    white 256 x 256 square. Returns (256, 256, 3) uint8."""
    image = _eight_bit(ImageOps.exif_transpose(image))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or image.has_transparency_data:
        flat = Image.new("RGBA", image.size, (*WHITE, 255))
        flat.alpha_composite(image.convert("RGBA"))
        image = flat
    image = image.convert("RGB")
    scale = SIZE / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    square = Image.new("RGB", (SIZE, SIZE), WHITE)
    square.paste(image.resize(size, Image.Resampling.LANCZOS), ((SIZE - size[0]) // 2, (SIZE - size[1]) // 2))
    return np.asarray(square, dtype=np.uint8)


def load_pixels(path: str) -> np.ndarray:
    """Decode the picture at ``path`` and apply :func:`fashiongen_pixels`; Pillow's error if it cannot."""
    with Image.open(path) as image:
        image.draft(None, (SIZE, SIZE))  # a JPEG decodes at 1/2, 1/4 or 1/8 scale, both sides >= 256
        image.load()
        return fashiongen_pixels(image)


def _load_batch(paths: list[str]) -> list[np.ndarray | str]:
    """Pixels, or why not, for each path."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(load_pixels(path))
        except UnidentifiedImageError:
            out.append("not an image Pillow knows")
        except Exception as exc:  # Pillow's decoders raise many types on corrupt data
            out.append(first_line(exc).replace(path, ""))
    return out


def _decoded(batches: list[list[str]], workers: int) -> Iterator[list[np.ndarray | str]]:
    """:func:`_load_batch` of each batch, in order, at most ``2 x workers`` batches in flight."""
    if not workers:
        yield from map(_load_batch, batches)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append(pool.submit(_load_batch, batch))  # may fork: a signal there is dropped
            if len(pending) > 2 * workers:
                raise_if_stopped()
                yield pending.popleft().result()
        while pending:
            raise_if_stopped()
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise PipelineError(
            "convert: a process decoding the photos died (killed, or out of memory?); "
            "nothing was written, rerun to start again"
        ) from None
    finally:  # a stop (SIGTERM, an error) must not wait for the batches still queued
        pool.shutdown(wait=True, cancel_futures=True)


# --- the HDF5 file -----------------------------------------------------------------------------


def _bytes_column(values: Iterable[str]) -> np.ndarray:
    encoded = [v.encode("latin-1") for v in values]
    width = max([1, *map(len, encoded)])
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def _write_text(f: h5py.File, rows: list[_Row]) -> None:
    """Every text key of the layout as (N, 1) latin-1 byte strings, and the product ids."""
    fields = {
        "name": [to_latin1(r.entry.name or r.entry.caption) for r in rows],
        "description": [to_latin1(r.entry.caption) for r in rows],
        "category": [to_latin1(r.entry.category) for r in rows],
    }
    for field, key in TEXT_FIELDS.items():
        f.create_dataset(key, data=_bytes_column(fields.get(field, [""] * len(rows))), track_times=False)
    ids = np.array([r.product_id for r in rows], dtype=np.int64).reshape(-1, 1)
    f.create_dataset(ID_KEY, data=ids, track_times=False)


def _write(handle, rows: list[_Row], workers: int, label: str) -> tuple[list[_Row], list[Skip]]:
    """Decode ``rows``' pictures into ``handle``'s HDF5 file; the rows kept, and those not decoded."""
    kept: list[_Row] = []
    skips: list[Skip] = []
    with (
        h5py.File(handle, "w", track_order=False) as f,
        tqdm(total=len(rows), unit="img", desc=label, disable=None, leave=False, file=sys.stderr) as bar,
    ):
        # one picture per chunk: 192 KiB, under h5py's 1 MiB chunk cache, and any row range reads whole chunks
        images = f.create_dataset(
            IMAGE_KEY,
            shape=(0, SIZE, SIZE, 3),
            maxshape=(None, SIZE, SIZE, 3),
            chunks=(1, SIZE, SIZE, 3),
            dtype=np.uint8,
            track_times=False,
        )
        batches = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
        for batch, results in zip(batches, _decoded([[r.path for r in b] for b in batches], workers)):
            good = [(row, pixels) for row, pixels in zip(batch, results) if not isinstance(pixels, str)]
            skips += [
                Skip(row.index, row.entry.where, row.entry.file, "unreadable image", f"{row.entry.file} ({why})")
                for row, why in zip(batch, results)
                if isinstance(why, str)
            ]
            if good:
                start = images.shape[0]
                images.resize(start + len(good), axis=0)
                images[start:] = np.stack([pixels for _, pixels in good])
                kept += [row for row, _ in good]
            bar.update(len(batch))
        if kept:
            _write_text(f, kept)
    return kept, skips


# --- the report and the command's function -----------------------------------------------------


def report(skips: list[Skip], captions: Path, total: int, full_list: Path | None) -> str:
    """The summary of skipped rows: counts by kind, then at most :data:`REPORT_LINES` rows."""
    lines = [f"skipped {len(skips)} of {total} rows of {captions.name} ({_counts(skips)}):"]
    lines += [f"  {captions.name} {s.where}: {s.reason}" for s in skips[:REPORT_LINES]]
    if len(skips) > REPORT_LINES:
        lines.append(f"  ... and {len(skips) - REPORT_LINES} more")
    if full_list is not None:
        lines.append(f"  full list: {full_list}")
    return "\n".join(lines)


def skipped_list_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.skipped.csv")


def _write_skipped(path: Path, skips: list[Skip]) -> None:
    with atomic_file(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(("where", "file", "reason"))
        writer.writerows((s.where, s.file, s.reason) for s in skips)


def convert(
    images: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike, workers: int = 2
) -> Converted:
    """Write ``out``: the good rows of ``captions`` (pictures from the folder ``images``) in the
    FashionGen layout; print the summary of skipped rows to stderr. ``workers`` processes decode
    the pictures (0: this process)."""
    began = time.perf_counter()
    images, captions, out = Path(images), Path(captions), Path(out)
    if not images.is_dir():
        raise PipelineError(f"{images}: no such images folder")
    if workers < 0:
        raise PipelineError(f"--workers must be >= 0, got {workers}")
    entries = read_captions(captions)
    if not entries:
        raise PipelineError(f"{captions}: no rows; nothing written")
    rows, skips = _check_text(entries, images)
    if not rows:
        raise _no_good_row(captions, skips, len(entries))
    with atomic_file(out, "w+b") as handle:
        kept, unreadable = _write(handle, rows, workers, f"convert {captions.name}")
        skips = sorted(skips + unreadable, key=lambda s: s.index)
        if not kept:  # inside the block: the temporary file goes too
            raise _no_good_row(captions, skips, len(entries))
    full_list = skipped_list_path(out)
    if skips:
        _write_skipped(full_list, skips)
        print(report(skips, captions, len(entries), full_list), file=sys.stderr)
    else:
        full_list.unlink(missing_ok=True)  # an earlier run's list would tell of rows now kept
    replaced = sum(any(to_latin1(t) != t for t in (r.entry.caption, r.entry.name, r.entry.category)) for r in kept)
    return Converted(
        out,
        len(kept),
        len({r.product_id for r in kept}),
        tuple(skips),
        full_list if skips else None,
        replaced,
        time.perf_counter() - began,
    )


def _no_good_row(captions: Path, skips: list[Skip], total: int) -> PipelineError:
    print(report(skips, captions, total, None), file=sys.stderr)
    return PipelineError(f"{captions}: no usable row, all {total} skipped ({_counts(skips)}); nothing written")


def _counts(skips: list[Skip]) -> str:
    """``"2 missing file, 1 empty caption"``: most frequent first."""
    return ", ".join(f"{n} {kind}" for kind, n in Counter(s.kind for s in skips).most_common())
