"""Write the embedding cache: every frozen encoder runs once per image and once per unique caption.

Usage::

    build_cache(captions, "data/extracted/train", "data/cache/train", encoders, 224, 64, batch_size=32)

The layout is ``fashiondiff.cache.format``'s. Work goes into ``<out>.partial/`` beside the
output, with ``.npy`` files allocated at full size (the CLIP token count is known from the
tokenizer before encoding) and a progress file updated after each flushed batch (captions
first, then images): a killed run resumes where it stopped, and the finished folder is
renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fashiondiff.cache.format import CAPTION_ARRAYS, FORMAT_VERSION, IMAGE_ARRAYS, TEXT_LENGTH, cache_identity
from fashiondiff.embed.encoders import (
    Encoders, blank_image_embed, caption_lengths, check_sizes, clip_pixels, encode_images, encode_texts, movq_pixels,
)
from fashiondiff.errors import PipelineError
from fashiondiff.io import write_json


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
        clip = clip_pixels(self.processor, [img], self.clip_size)[0]
        return clip, torch.from_numpy(movq_pixels(img, self.resolution)), error


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
                resolution: int, batch_size: int = 32, dtype: str = "float32", workers: int = 1) -> dict:
    """Encode every row of ``captions`` (a DataFrame from extract) into ``out_dir``; resumable."""
    import pandas as pd

    out_dir, images_root = Path(out_dir), Path(images_root)
    check_sizes(enc, clip_image_size, resolution)
    identity = cache_identity(enc.prior, enc.decoder, clip_image_size, resolution, dtype)
    # The image processor's class joins the fingerprint: transformers 5 picks a torchvision or
    # a PIL backend by what is installed, and pixels differ by up to 2 uint8 levels between them.
    fingerprint = _fingerprint(captions, {**identity, "image_processor": type(enc.image_processor).__name__})
    work = out_dir.with_name(f".{out_dir.name}.partial")
    n = len(captions)
    codes, texts = pd.factorize(captions["caption"], sort=False)  # unique captions, first-seen order
    texts = [str(t) for t in texts]
    lengths = caption_lengths(enc, texts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shapes = _shapes(enc, resolution, int(offsets[-1]))
    counts = {"images": n, "captions": len(texts), "tokens": int(offsets[-1])}
    arrays, state = _open_work(work, fingerprint, shapes, counts, dtype)
    if state["captions"] or state["images"]:
        print(f"embed: resuming {out_dir} at {state['captions']}/{len(texts)} captions, "
              f"{state['images']}/{n} images")
    else:
        arrays["caption"][:] = codes
        arrays["text_offsets"][:] = offsets
    started = time.perf_counter()

    def save_progress() -> None:
        for arr in arrays.values():
            arr.flush()
        write_json(work / "progress.json", {**state, "fingerprint": fingerprint})

    with tqdm(total=len(texts), initial=state["captions"], unit="caption", desc=f"embed {out_dir.name} text",
              dynamic_ncols=True) as bar:
        for lo in range(state["captions"], len(texts), batch_size):
            hi = min(lo + batch_size, len(texts))
            encoded = {k: v.cpu().numpy() for k, v in encode_texts(enc, texts[lo:hi]).items()}
            for name in CAPTION_ARRAYS:
                arrays[name][lo:hi] = encoded[name]
            if not np.array_equal(encoded["text_mask"].sum(axis=1), lengths[lo:hi]):
                raise PipelineError(f"embed: CLIP token counts changed between two tokenizer calls ({enc.prior})")
            hidden = encoded["text_hidden"]
            for j, c in enumerate(range(lo, hi)):
                arrays["text_hidden"][offsets[c]:offsets[c + 1]] = hidden[j, : lengths[c]]
            state["captions"] = hi
            save_progress()
            bar.update(hi - lo)
    done = state["images"]
    loader = torch.utils.data.DataLoader(
        _Images(images_root, captions["image"].tolist()[done:], enc.image_processor, clip_image_size,
                resolution),
        batch_size=batch_size, num_workers=workers, shuffle=False,
    )
    pos = done
    with tqdm(total=n, initial=done, unit="image", desc=f"embed {out_dir.name} images",
              dynamic_ncols=True) as bar:
        for clip_px, movq_px, errors in _batches(loader, lambda: pos):
            bad = [e for e in errors if e]
            if bad:
                raise PipelineError(f"{bad[0]}; the {pos} images before it are kept, rerun to resume")
            stop = pos + len(clip_px)
            for name, value in encode_images(enc, clip_px, movq_px).items():
                arrays[name][pos:stop] = value.cpu().numpy()
            pos = stop
            state["images"] = pos
            save_progress()
            bar.update(len(clip_px))
    seconds = time.perf_counter() - started
    _finish(work, out_dir, captions, enc, identity, fingerprint, shapes, counts, dtype)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    summary = {"items": n, "captions": len(texts), "bytes_per_item": size / max(n, 1), "seconds": seconds,
               "items_per_s": (n - done) / max(seconds, 1e-9)}
    print(f"embed: {n} images, {len(texts)} unique captions into {out_dir} "
          f"({summary['bytes_per_item'] / 1024:.1f} KiB/image, {summary['items_per_s']:.1f} images/s)")
    return summary


def _batches(loader, done):
    """The loader's batches; a loader worker that died (OOM killer, kill -9) fails in one line.

    torch notices a dead worker within seconds (its SIGCHLD handler) and raises a
    RuntimeError; ``done()`` says how many items are safe in the partial cache.
    """
    iterator = iter(loader)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise PipelineError(f"embed: the image loader process died ({str(exc).splitlines()[0]}); "
                                f"the {done()} images before it are kept, rerun to resume") from None


def _open_work(work: Path, fingerprint: str, shapes: dict, counts: dict, dtype: str):
    """Reopen a matching partial folder (resume) or start a fresh one."""
    progress = work / "progress.json"
    state = {"captions": 0, "images": 0}
    if progress.is_file():
        saved = json.loads(progress.read_text())
        if saved.get("fingerprint") == fingerprint:
            state = {k: int(saved.get(k, 0)) for k in state}
    resume = bool(state["captions"] or state["images"])
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (shape, kind) in shapes.items():
        path = work / f"{name}.npy"
        rows = _rows(name, counts["images"], counts["captions"], counts["tokens"])
        if resume:
            arrays[name] = np.load(path, mmap_mode="r+")
        else:
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=_np_dtype(kind, dtype),
                                                     shape=(rows, *shape))
    if not resume:
        write_json(progress, {**state, "fingerprint": fingerprint})
    return arrays, state


def _finish(work: Path, out_dir: Path, captions, enc: Encoders, identity: dict, fingerprint: str,
            shapes: dict, counts: dict, dtype: str) -> None:
    np.save(work / "rows.npy", captions["row"].to_numpy(dtype=np.int64))
    uncond = {k: v.cpu().numpy() for k, v in encode_texts(enc, [""]).items()}
    uncond["image_embeds"] = blank_image_embed(enc).cpu().numpy()
    for name, value in uncond.items():
        np.save(work / f"uncond_{name}.npy", value.astype(np.bool_ if value.dtype == np.bool_ else dtype))
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
    (work / "progress.json").unlink()
    write_json(work / "meta.json", meta)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
