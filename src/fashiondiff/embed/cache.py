"""The embedding cache: every frozen encoder runs once per image and caption.

Usage::

    build_cache(captions, "data/extracted/train", "data/cache/train", encoders, batch_size=32)
    cache = open_cache("data/cache/train", expect=cache_identity(params))
    cache.arrays["image_embeds"][rows]      # memory-mapped NumPy arrays

A cache folder holds one ``.npy`` file per array (memory-mappable, keyed by position;
``rows.npy`` maps position -> ``row`` of captions.parquet), the encodings of the
empty caption and of the blank image (for condition dropout), and ``meta.json``,
which records the models and preprocessing that made it. Training reads only this.

Work goes into ``<out>.partial/`` beside the output, with ``.npy`` files allocated
at full size and a progress file updated after each flushed batch: a killed run
resumes where it stopped, and the finished folder is renamed into place whole.
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

from fashiondiff.errors import PipelineError
from fashiondiff.io import write_json

FORMAT_VERSION = 1
TEXT_LENGTH = 77

# What must match between a cache and the params that read it.
IDENTITY_KEYS = ("prior", "decoder", "clip_image_size", "resolution", "dtype")


@dataclass
class Encoders:
    """The frozen parts of both 2.1 pipelines that the cache needs."""

    prior: str  # the names they were loaded from (recorded in the cache)
    decoder: str
    clip_tokenizer: object
    clip_text: torch.nn.Module
    clip_vision: torch.nn.Module
    image_processor: object
    mclip_tokenizer: object
    mclip: torch.nn.Module
    movq: torch.nn.Module
    device: torch.device


def load_encoders(prior: str, decoder: str, device: str | None = None) -> Encoders:
    """Load only the encoders (no prior, no U-Net) through the one loader."""
    from fashiondiff.models.loader import load_decoder, load_prior

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    p = load_prior(prior, prior=None)
    d = load_decoder(decoder, unet=None)
    for module in (p.text_encoder, p.image_encoder, d.text_encoder, d.movq):
        module.to(dev).eval().requires_grad_(False)
    return Encoders(
        prior=prior, decoder=decoder, clip_tokenizer=p.tokenizer, clip_text=p.text_encoder,
        clip_vision=p.image_encoder, image_processor=p.image_processor,
        mclip_tokenizer=d.tokenizer, mclip=d.text_encoder, movq=d.movq, device=dev,
    )


def cache_identity(prior: str, decoder: str, clip_image_size: int, resolution: int, dtype: str) -> dict:
    return {"prior": prior, "decoder": decoder, "clip_image_size": clip_image_size,
            "resolution": resolution, "dtype": dtype}


# --------------------------------------------------------------------------- encoding


def movq_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """Image -> float32 CHW in [-1, 1] at ``resolution``, as KandinskyImg2ImgPipeline prepares it."""
    image = image.convert("RGB").resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1)


def clip_pixels(processor, images: list[Image.Image], size: int) -> torch.Tensor:
    """CLIP pixel values at ``size`` (resize shortest edge, centre crop, normalise)."""
    out = processor(images, size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                    return_tensors="pt")
    return out["pixel_values"]


@torch.no_grad()
def encode_texts(enc: Encoders, texts: list[str]) -> dict[str, np.ndarray]:
    """CLIP text outputs (as the prior pipeline computes them) and MultilingualCLIP outputs."""
    tok = enc.clip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt")
    # The prior pipeline calls the CLIP text encoder without a mask and passes the mask to the prior.
    clip_out = enc.clip_text(tok.input_ids.to(enc.device))
    mtok = enc.mclip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                               return_tensors="pt")
    pooled, hidden = enc.mclip(input_ids=mtok.input_ids.to(enc.device),
                               attention_mask=mtok.attention_mask.to(enc.device))
    return {
        "text_embeds": clip_out.text_embeds,
        "text_hidden": clip_out.last_hidden_state,
        "text_mask": tok.attention_mask.bool(),
        "mclip_embeds": pooled,
        "mclip_hidden": hidden,
        "mclip_mask": mtok.attention_mask.bool(),
    }


@torch.no_grad()
def encode_images(enc: Encoders, clip_px: torch.Tensor, movq_px: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "image_embeds": enc.clip_vision(clip_px.to(enc.device)).image_embeds,
        "latents": enc.movq.encode(movq_px.to(enc.device)).latents,
    }


@torch.no_grad()
def blank_image_embed(enc: Encoders) -> torch.Tensor:
    """CLIP embedding of an all-zero pixel tensor: 2.1's negative image embedding (get_zero_embed)."""
    size = enc.clip_vision.config.image_size
    return enc.clip_vision(torch.zeros(1, 3, size, size, device=enc.device)).image_embeds


# --------------------------------------------------------------------------- the cache


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
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    h.update(captions[["row", "caption", "image"]].to_json(orient="values").encode())
    return h.hexdigest()


def _shapes(enc: Encoders, resolution: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-item shape and kind ('f' float in the cache dtype, 'b' bool) of every cached array."""
    probe = encode_texts(enc, [""])
    factor = 2 ** (len(enc.movq.config.block_out_channels) - 1)
    lat = (enc.movq.config.latent_channels, resolution // factor, resolution // factor)
    dim = enc.clip_vision.config.projection_dim
    shapes = {k: (tuple(v.shape[1:]), "b" if v.dtype == torch.bool else "f") for k, v in probe.items()}
    shapes["image_embeds"] = ((dim,), "f")
    shapes["latents"] = (lat, "f")
    return shapes


def build_cache(captions, images_root: str | Path, out_dir: str | Path, enc: Encoders, clip_image_size: int,
                resolution: int, batch_size: int = 32, dtype: str = "float32", workers: int = 1) -> dict:
    """Encode every row of ``captions`` (a DataFrame from extract) into ``out_dir``; resumable."""
    out_dir, images_root = Path(out_dir), Path(images_root)
    _check_sizes(enc, clip_image_size, resolution)
    identity = cache_identity(enc.prior, enc.decoder, clip_image_size, resolution, dtype)
    # The image processor's class joins the fingerprint: transformers 5 picks a torchvision or
    # a PIL backend by what is installed, and pixels differ by up to 2 uint8 levels between them.
    fingerprint = _fingerprint(captions, {**identity, "image_processor": type(enc.image_processor).__name__})
    work = out_dir.with_name(f".{out_dir.name}.partial")
    n = len(captions)
    shapes = _shapes(enc, resolution)
    arrays, done = _open_work(work, fingerprint, shapes, n, dtype)
    if done:
        print(f"embed: resuming {out_dir} at {done}/{n} items")
    started = time.perf_counter()
    texts = captions["caption"].tolist()
    loader = torch.utils.data.DataLoader(
        _Images(images_root, captions["image"].tolist()[done:], enc.image_processor, clip_image_size,
                resolution),
        batch_size=batch_size, num_workers=workers, shuffle=False,
    )
    pos = done
    bar = tqdm(total=n, initial=done, unit="item", desc=f"embed {out_dir.name}", dynamic_ncols=True)
    with bar:
        for clip_px, movq_px, errors in _batches(loader, lambda: pos):
            bad = [e for e in errors if e]
            if bad:
                raise PipelineError(f"{bad[0]}; the {pos} items before it are kept, rerun to resume")
            stop = pos + len(clip_px)
            encoded = {**encode_texts(enc, texts[pos:stop]), **encode_images(enc, clip_px, movq_px)}
            for name, value in encoded.items():
                arrays[name][pos:stop] = value.cpu().numpy()
            for arr in arrays.values():
                arr.flush()
            pos = stop
            write_json(work / "progress.json", {"done": pos, "fingerprint": fingerprint})
            bar.update(len(clip_px))
    seconds = time.perf_counter() - started
    _finish(work, out_dir, captions, enc, identity, fingerprint, shapes, dtype)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    summary = {"items": n, "bytes_per_item": size / max(n, 1), "seconds": seconds,
               "items_per_s": (n - done) / max(seconds, 1e-9)}
    print(f"embed: {n} items into {out_dir} ({summary['bytes_per_item'] / 1024:.1f} KiB/item, "
          f"{summary['items_per_s']:.1f} items/s)")
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
                                f"the {done()} items before it are kept, rerun to resume") from None


def _check_sizes(enc: Encoders, clip_image_size: int, resolution: int) -> None:
    native = enc.clip_vision.config.image_size
    if clip_image_size != native:
        raise PipelineError(
            f"params: clip_image_size {clip_image_size} does not match the image encoder of "
            f"{enc.prior} ({native})"
        )
    factor = 2 ** (len(enc.movq.config.block_out_channels) - 1)
    if resolution % (factor * factor):
        raise PipelineError(f"params: model.resolution {resolution} must be a multiple of {factor * factor}")


def _open_work(work: Path, fingerprint: str, shapes: dict, n: int, dtype: str):
    """Reopen a matching partial folder (resume) or start a fresh one."""
    progress = work / "progress.json"
    done = 0
    if progress.is_file():
        state = json.loads(progress.read_text())
        if state.get("fingerprint") == fingerprint:
            done = int(state["done"])
    if done == 0 and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, (shape, kind) in shapes.items():
        np_dtype = np.bool_ if kind == "b" else np.dtype(dtype)
        path = work / f"{name}.npy"
        if done:
            arrays[name] = np.load(path, mmap_mode="r+")
        else:
            arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(n, *shape))
    if not done:
        write_json(progress, {"done": 0, "fingerprint": fingerprint})
    return arrays, done


def _finish(work: Path, out_dir: Path, captions, enc: Encoders, identity: dict, fingerprint: str,
            shapes: dict, dtype: str) -> None:
    np.save(work / "rows.npy", captions["row"].to_numpy(dtype=np.int64))
    uncond = {k: v.cpu().numpy() for k, v in encode_texts(enc, [""]).items()}
    uncond["image_embeds"] = blank_image_embed(enc).cpu().numpy()
    for name, value in uncond.items():
        np.save(work / f"uncond_{name}.npy", value.astype(np.bool_ if value.dtype == np.bool_ else dtype))
    meta = {
        **identity,
        "format": FORMAT_VERSION,
        "items": len(captions),
        "fingerprint": fingerprint,
        "arrays": {k: {"shape": list(s), "dtype": "bool" if kind == "b" else dtype}
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


@dataclass
class Cache:
    """A finished cache, arrays memory-mapped."""

    path: Path
    meta: dict
    arrays: dict[str, np.ndarray]
    uncond: dict[str, np.ndarray]
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def open_cache(path: str | Path, expect: dict | None = None) -> Cache:
    """Open a finished cache; fail clearly if it was made by other models or preprocessing."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise PipelineError(f"{path}: not a finished embedding cache (no meta.json): run `dvc repro embed`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise PipelineError(f"{path}: cache format {meta.get('format')} is not {FORMAT_VERSION}: re-run embed")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise PipelineError(
                f"{path}: cache made with {key}={meta.get(key)!r}, but this run uses {key}={want!r}: "
                f"re-run the embed stage"
            )
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    uncond = {f.stem[len("uncond_"):]: np.load(f) for f in sorted(path.glob("uncond_*.npy"))}
    return Cache(path=path, meta=meta, arrays=arrays, uncond=uncond, rows=np.load(path / "rows.npy"))
