"""Write the embedding cache: every frozen encoder runs once per image and once per unique caption.

Usage::

    build_cache(captions, "data/extracted/train", "data/cache/train", encoders, 224, 64, batch_size=32)

The layout is ``fashiondiff.cache.format``'s. Work goes into ``<out>.partial/`` beside the
output, with ``.npy`` files allocated at full size and reserved on disk at once (the CLIP
token count is known from the tokenizer before encoding; a full disk fails there, in one
line) and a progress file that lists the batches written (captions first, then images;
batch ``b`` is rows ``b * batch_size`` on, whatever the number of processes): a stopped or
killed run resumes where it stopped, and the finished folder is renamed into place whole.

Under ``accelerate launch`` each process encodes a contiguous share of the batches still to
do, round by round, and hands them to process 0, which writes them: the cache is the same,
byte for byte, as one process's (each batch is encoded alone, as there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fashiondiff.cache.format import CAPTION_ARRAYS, FORMAT_VERSION, IMAGE_ARRAYS, TEXT_LENGTH, cache_identity
from fashiondiff.embed.encoders import (
    Encoders,
    blank_image_embed,
    caption_lengths,
    check_sizes,
    clip_pixels,
    encode_images,
    encode_texts,
    movq_pixels,
)
from fashiondiff.errors import PipelineError, first_line
from fashiondiff.io import write_json
from fashiondiff.spread import (
    HandOverFailed,
    Interrupted,
    Ranks,
    batch_runs,
    batches_in,
    disk_full_is_an_error,
    with_kept,
)


class _Images(torch.utils.data.Dataset):
    """Reads PNGs and prepares both encoders' pixels (runs in a DataLoader worker)."""

    def __init__(self, root: Path, paths: list[str], processor, clip_size: int, resolution: int):
        self.root, self.paths = root, paths
        self.processor, self.clip_size, self.resolution = processor, clip_size, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as exc:  # reported by the main process, which owns the error message
            img, error = Image.new("RGB", (self.resolution, self.resolution)), f"{path}: cannot read image ({exc})"
        else:
            error = ""
        return clip_pixels(self.processor, [img], self.clip_size)[0], movq_pixels([img], self.resolution)[0], error


def _fingerprint(captions, identity: dict) -> str:
    h = hashlib.sha256(json.dumps({**identity, "format": FORMAT_VERSION}, sort_keys=True).encode())
    h.update(captions[["row", "caption", "image"]].to_json(orient="values").encode())
    return h.hexdigest()


def _shapes(enc: Encoders, resolution: int, tokens: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-row shape and kind ('f' float in the cache dtype, 'i' int) of every stored array.

    Rows are images, unique captions or (``text_hidden``) CLIP tokens; see the module doc.
    """
    probe = encode_texts(enc, [""])
    factor = 2 ** (len(enc.movq.config.block_out_channels) - 1)
    return {
        "latents": ((enc.movq.config.latent_channels, resolution // factor, resolution // factor), "f"),
        "image_embeds": ((enc.clip_vision.config.projection_dim,), "f"),
        "caption": ((), "i"),
        **{k: (tuple(probe[k].shape[1:]), "f") for k in CAPTION_ARRAYS},
        "text_hidden": ((probe["text_hidden"].shape[-1],), "f"),
        "text_offsets": ((), "o"),
    }


def _rows(name: str, n_images: int, n_captions: int, tokens: int) -> int:
    if name in IMAGE_ARRAYS or name == "caption":
        return n_images
    return {"text_hidden": tokens, "text_offsets": n_captions + 1}.get(name, n_captions)


def _np_dtype(kind: str, dtype: str):
    return {"f": np.dtype(dtype), "i": np.dtype(np.int32), "o": np.dtype(np.int64)}[kind]


def build_cache(captions, images_root: str | Path, out_dir: str | Path, enc: Encoders, clip_image_size: int,
                resolution: int, batch_size: int = 32, dtype: str = "float32", workers: int = 1,
                ranks: Ranks | None = None) -> dict | None:
    """Encode every row of ``captions`` (a DataFrame from extract) into ``out_dir``; resumable.

    With ``ranks`` (several processes), each encodes a contiguous share of the batches still to
    do and process 0 writes them all; the others return None once they have handed theirs over.
    """
    import pandas as pd

    ranks = ranks or Ranks("embed", 0.0)
    out_dir, images_root = Path(out_dir), Path(images_root)
    check_sizes(enc, clip_image_size, resolution)
    identity = cache_identity(enc.prior, enc.decoder, clip_image_size, resolution, dtype)
    # The image processor's class joins the fingerprint: transformers 5 picks a torchvision or
    # a PIL backend by what is installed, and pixels differ by up to 2 uint8 levels between them.
    fingerprint = _fingerprint(captions, {**identity, "image_processor": type(enc.image_processor).__name__})
    n = len(captions)
    codes, texts = pd.factorize(captions["caption"], sort=False)  # unique captions, first-seen order
    texts = [str(t) for t in texts]
    lengths = caption_lengths(enc, texts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shapes = _shapes(enc, resolution, int(offsets[-1]))
    counts = {"images": n, "captions": len(texts), "tokens": int(offsets[-1])}
    work = out_dir.with_name(f".{out_dir.name}.partial")
    writer = None
    try:
        if ranks.main:
            writer = _Writer.open(work, fingerprint, shapes, counts, dtype, batch_size)
            if writer.fresh:
                writer.store_layout(codes, offsets)
            else:
                print(f"embed: resuming {out_dir} at {writer.progress_line()}")
        done = ranks.broadcast(writer and writer.done, f"the list of finished batches ({work})")
        started = time.perf_counter()
        todo = {kind: [b for b in range(-(-counts[kind] // batch_size)) if b not in done[kind]]
                for kind in ("captions", "images")}
        _encode_captions(enc, texts, lengths, todo["captions"], batch_size, ranks, writer,
                         f"embed {out_dir.name} text")
        _encode_images(enc, captions["image"].tolist(), images_root, todo["images"], batch_size, workers,
                       clip_image_size, resolution, ranks, writer, f"embed {out_dir.name} images")
        seconds = time.perf_counter() - started
        if writer is None:
            return None
        _finish(work, out_dir, captions, enc, identity, fingerprint, shapes, counts, dtype, writer.kept)
    except (Interrupted, HandOverFailed) as exc:
        kept = writer.kept() if writer else _KEPT_ELSEWHERE if not ranks.main else _NOTHING_KEPT
        raise with_kept("embed", exc, kept) from None
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    encoded = sum(hi - lo for lo, hi in (_span(b, batch_size, n) for b in todo["images"]))
    summary = {"items": n, "captions": len(texts), "bytes_per_item": size / max(n, 1), "seconds": seconds,
               "items_per_s": encoded / max(seconds, 1e-9), "processes": ranks.count}
    print(f"embed: {n} images, {len(texts)} unique captions into {out_dir} "
          f"({summary['bytes_per_item'] / 1024:.1f} KiB/image, {summary['items_per_s']:.1f} images/s, "
          f"{ranks.count} process{'es' if ranks.count > 1 else ''})")
    return summary


_KEPT_ELSEWHERE = "the batches process 0 had written are kept, rerun to resume"
_NOTHING_KEPT = "no batch was finished yet, rerun to start"


def _encode_captions(enc: Encoders, texts: list[str], lengths: np.ndarray, todo: list[int], batch_size: int,
                     ranks: Ranks, writer: _Writer | None, desc: str) -> None:
    """Every caption batch in ``todo``: this process's share encoded here, all written by process 0."""
    mine = ranks.shard(todo)
    rounds = ranks.rounds(len(todo))
    with _bar(writer, "captions", len(texts), desc) as bar:
        for k in range(rounds):
            result = None
            if k < len(mine):
                lo, hi = _span(mine[k], batch_size, len(texts))
                encoded = {key: v.cpu().numpy() for key, v in encode_texts(enc, texts[lo:hi]).items()}
                if not np.array_equal(encoded["text_mask"].sum(axis=1), lengths[lo:hi]):
                    raise PipelineError(f"embed: CLIP token counts changed between two tokenizer calls ({enc.prior})")
                hidden = encoded["text_hidden"]
                result = (mine[k], {name: encoded[name] for name in CAPTION_ARRAYS},
                          [hidden[j, :lengths[c]] for j, c in enumerate(range(lo, hi))])
            parts = ranks.gather(result, f"caption batches (round {k + 1} of {rounds})")
            if writer is not None:
                bar.update(writer.write_captions([p for p in parts if p is not None]))


def _encode_images(enc: Encoders, paths: list[str], root: Path, todo: list[int], batch_size: int, workers: int,
                   clip_image_size: int, resolution: int, ranks: Ranks, writer: _Writer | None,
                   desc: str) -> None:
    """Every image batch in ``todo``: this process's share read by a DataLoader and encoded here."""
    mine = ranks.shard(todo)
    rounds = ranks.rounds(len(todo))
    loader = torch.utils.data.DataLoader(
        _Images(root, paths, enc.image_processor, clip_image_size, resolution),
        batch_sampler=[range(*_span(b, batch_size, len(paths))) for b in mine], num_workers=workers,
    )
    try:
        batches = iter(loader) if mine else None  # no share, no loader process
        with _bar(writer, "images", len(paths), desc) as bar:
            for k in range(rounds):
                result = None
                if k < len(mine):
                    clip_px, movq_px, errors = next(batches)
                    bad = [e for e in errors if e]
                    if bad:
                        raise PipelineError(f"{bad[0]}; {writer.kept() if writer else _KEPT_ELSEWHERE}")
                    result = (mine[k], {name: value.cpu().numpy()
                                        for name, value in encode_images(enc, clip_px, movq_px).items()})
                parts = ranks.gather(result, f"image batches (round {k + 1} of {rounds})")
                if writer is not None:
                    bar.update(writer.write_images([p for p in parts if p is not None]))
    except RuntimeError as exc:
        # A loader process that died (OOM killer, kill -9): torch notices within seconds (its
        # SIGCHLD handler) and raises wherever this process is, not only in next() (in iter(),
        # when it dies while starting).
        if "DataLoader worker" not in str(exc):
            raise
        raise PipelineError(f"embed: the image loader process died ({first_line(exc)}); "
                            f"{writer.kept() if writer else _KEPT_ELSEWHERE}") from None


def _span(batch: int, batch_size: int, total: int) -> tuple[int, int]:
    """Rows of ``batch``: batches are fixed by the batch size, whatever the process count."""
    return batch * batch_size, min((batch + 1) * batch_size, total)


def _bar(writer: _Writer | None, kind: str, total: int, desc: str):
    """Process 0's progress bar over what every process finished; the others show none."""
    initial = writer.count(kind) if writer else 0
    unit = kind[:-1]
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, disable=writer is None)


@dataclass
class _Writer:
    """Process 0's partial folder: the arrays (allocated whole), which batches are in, the resume."""

    work: Path
    fingerprint: str
    batch_size: int
    counts: dict
    arrays: dict[str, np.ndarray]
    done: dict[str, set[int]]
    fresh: bool
    offsets: np.ndarray | None = None

    @classmethod
    def open(cls, work: Path, fingerprint: str, shapes: dict, counts: dict, dtype: str,
             batch_size: int) -> _Writer:
        """Reopen a matching partial folder (resume) or allocate a fresh one.

        A partial folder made with another ``embed.batch_size`` is not resumed: batches are the
        unit of work and of the cache's bytes (a batch's convolutions round by its shape).
        """
        progress = work / "progress.json"
        done = {"captions": set(), "images": set()}
        if progress.is_file():
            saved = json.loads(progress.read_text())
            if saved.get("fingerprint") == fingerprint and saved.get("batch_size") == batch_size:
                done = {k: batches_in(saved.get(f"{k[:-1]}_batches", [])) for k in done}
        fresh = not (done["captions"] or done["images"])
        writer = cls(work, fingerprint, batch_size, counts, {}, done, fresh)
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        for name, (shape, kind) in shapes.items():
            path = work / f"{name}.npy"
            rows = _rows(name, counts["images"], counts["captions"], counts["tokens"])
            with disk_full_is_an_error(path, writer.kept):
                writer.arrays[name] = (_allocate(path, _np_dtype(kind, dtype), (rows, *shape))
                                       if fresh else np.load(path, mmap_mode="r+"))
        if fresh:
            writer.save()
        writer.offsets = np.asarray(writer.arrays["text_offsets"])
        return writer

    def store_layout(self, codes: np.ndarray, offsets: np.ndarray) -> None:
        self.arrays["caption"][:] = codes
        self.arrays["text_offsets"][:] = offsets
        self.offsets = offsets

    def write_captions(self, parts) -> int:
        """Write gathered caption batches; returns how many captions they held."""
        written, batches = 0, []
        for batch, arrays, hidden in parts:
            lo, hi = _span(batch, self.batch_size, self.counts["captions"])
            for name, value in arrays.items():
                self.arrays[name][lo:hi] = value
            for c, h in zip(range(lo, hi), hidden):
                self.arrays["text_hidden"][self.offsets[c]:self.offsets[c + 1]] = h
            batches.append(batch)
            written += hi - lo
        self.save("captions", batches)
        return written

    def write_images(self, parts) -> int:
        written, batches = 0, []
        for batch, arrays in parts:
            lo, hi = _span(batch, self.batch_size, self.counts["images"])
            for name, value in arrays.items():
                self.arrays[name][lo:hi] = value
            batches.append(batch)
            written += hi - lo
        self.save("images", batches)
        return written

    def count(self, kind: str, done: dict[str, set[int]] | None = None) -> int:
        """Captions or images in the finished batches (``done``, by default the recorded ones)."""
        done = self.done if done is None else done
        return sum(hi - lo for lo, hi in (_span(b, self.batch_size, self.counts[kind]) for b in done[kind]))

    def progress_line(self) -> str:
        return ", ".join(f"{self.count(k)}/{self.counts[k]} {k}" for k in ("captions", "images"))

    def kept(self) -> str:
        return f"the finished {self.progress_line()} are kept in {self.work}, rerun to resume"

    def save(self, kind: str | None = None, batches: list[int] = ()) -> None:
        """Flush the arrays, then record their batches (a batch counts once its bytes are on disk).

        ``batches`` of ``kind`` join ``done`` only once progress.json lists them: a signal during
        the flush leaves them out of the "kept" line, which says what a rerun will find.
        """
        for arr in self.arrays.values():
            arr.flush()
        done = {k: v | set(batches) if k == kind else v for k, v in self.done.items()}
        write_json(self.work / "progress.json", {  # a full disk: fashiondiff.io's one line, the old file kept
            "fingerprint": self.fingerprint, "batch_size": self.batch_size,
            "caption_batches": batch_runs(done["captions"]), "image_batches": batch_runs(done["images"]),
            "captions": int(self.count("captions", done)), "images": int(self.count("images", done))})
        self.done = done


def _allocate(path: Path, dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A ``.npy`` memory map whose blocks are reserved on disk now: a full disk is an OSError
    here, not a SIGBUS at the first write into a page the file system cannot place."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as handle:
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    return arr


def _finish(work: Path, out_dir: Path, captions, enc: Encoders, identity: dict, fingerprint: str,
            shapes: dict, counts: dict, dtype: str, kept) -> None:
    """The per-cache files, then the folder renamed into place (progress.json goes last but one:
    a full disk before it leaves a partial folder that the rerun finishes)."""
    def save(name: str, value: np.ndarray) -> None:
        with disk_full_is_an_error(work / name, kept):
            np.save(work / name, value)

    save("rows.npy", captions["row"].to_numpy(dtype=np.int64))
    uncond = {k: v.cpu().numpy() for k, v in encode_texts(enc, [""]).items()}
    uncond["image_embeds"] = blank_image_embed(enc).cpu().numpy()
    for name, value in uncond.items():
        save(f"uncond_{name}.npy", value.astype(np.bool_ if value.dtype == np.bool_ else dtype))
    meta = {
        **identity,
        "format": FORMAT_VERSION,
        "items": counts["images"],
        "captions": counts["captions"],
        "text_tokens": counts["tokens"],
        "text_length": TEXT_LENGTH,
        "fingerprint": fingerprint,
        "arrays": {k: {"rows": _rows(k, counts["images"], counts["captions"], counts["tokens"]),
                       "shape": list(s), "dtype": str(_np_dtype(kind, dtype))}
                   for k, (s, kind) in shapes.items()},
        "encoders": {
            "clip_text": type(enc.clip_text).__name__, "clip_vision": type(enc.clip_vision).__name__,
            "mclip": type(enc.mclip).__name__, "movq": type(enc.movq).__name__,
            "image_processor": type(enc.image_processor).__name__,
        },
    }
    write_json(work / "meta.json", meta)
    (work / "progress.json").unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
