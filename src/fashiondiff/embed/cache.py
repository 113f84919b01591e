"""The embedding cache: every frozen encoder runs once per image and once per unique caption.

Usage::

    build_cache(captions, "data/extracted/train", "data/cache/train", encoders, batch_size=32)
    cache = open_cache("data/cache/train", expect=cache_identity(params))
    batch = cache.fetch(index, ("image_embeds", "text_hidden", "text_mask"))   # per-image NumPy arrays

Layout (format 2). Per image (position ``i``, memory-mapped ``.npy``): ``latents``
(MoVQ), ``image_embeds`` (CLIP), ``caption`` (int32 row of the caption arrays) and
``rows`` (position -> ``row`` of captions.parquet). Per UNIQUE caption (FashionGen's
poses of a product share their title, and many products share one): ``text_embeds``
(CLIP pooled), ``mclip_embeds`` and ``mclip_hidden`` (all 77 positions), and the CLIP
text hidden states of the caption's real tokens only, concatenated in ``text_hidden``
with ``text_offsets`` (caption ``c`` owns rows ``offsets[c]:offsets[c+1]``; its length is
the attention mask, which CLIP's tokenizer pads on the right). ``fetch`` hands training
the per-image layout of format 1: text hidden states zero-padded back to 77 positions,
the mask rebuilt from the lengths. Plus the encodings of the empty caption and of the
blank image (condition dropout, stored whole) and ``meta.json``, which records the
models and preprocessing that made it.

Why the two text arrays differ (diffusers 0.42.1, checked in its code):

* The prior never sees CLIP's padded positions. ``KandinskyPriorPipeline._encode_prompt``
  keeps the tokenizer's mask (pipelines/kandinsky/pipeline_kandinsky_prior.py:326) and
  passes it as ``attention_mask`` to the prior (:507-508); ``PriorTransformer.forward``
  turns it into an additive -10000 bias on those key positions for every query
  (models/transformers/prior_transformer.py:290-293), on top of the causal mask
  (:157-162), and reads only the last token's output (:308-309). exp(-10000 + s) is 0 in
  float32/bf16/fp16, so whatever the padded hidden states hold contributes exactly 0:
  they need not be stored (tests/test_embed.py checks the loss is bit-identical with
  zeros there). The positions still matter (fixed 81-entry positional embedding and
  causal mask, :121, :157), hence the padding back to 77 at batch time.
* The 2.1 U-Net attends to all 77 M-CLIP positions. ``KandinskyPipeline`` runs
  M-CLIP with the mask (pipelines/kandinsky/pipeline_kandinsky.py:165-168) but calls the
  U-Net without ``encoder_attention_mask`` (:360-366); ``TextImageProjection`` projects
  every position (models/embeddings.py:1267-1277, via unet_2d_condition.py:947-955) and
  the mask bias is applied only when one is given (unet_2d_condition.py:1072). XLM-R's
  outputs at padded positions depend on the caption (they attend to its tokens), so
  ``mclip_hidden`` stays whole. Its mask is not stored: nothing downstream reads it.

At full size in float16 (``embed.dtype``, recommended for real runs) this is about
50 KiB per FashionGen image against 284 KiB in format 1 (bench/bench_cache.py).

Work goes into ``<out>.partial/`` beside the output, with ``.npy`` files allocated
at full size (the CLIP token count is known from the tokenizer before encoding) and a
progress file updated after each flushed batch (captions first, then images): a killed
run resumes where it stopped, and the finished folder is renamed into place whole.
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

FORMAT_VERSION = 2  # 1: every text array stored once per image, 77 positions
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
    h = hashlib.sha256(json.dumps({**identity, "format": FORMAT_VERSION}, sort_keys=True).encode())
    h.update(captions[["row", "caption", "image"]].to_json(orient="values").encode())
    return h.hexdigest()


IMAGE_ARRAYS = ("latents", "image_embeds")
CAPTION_ARRAYS = ("text_embeds", "mclip_embeds", "mclip_hidden")  # one row per unique caption


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


def caption_lengths(enc: Encoders, texts: list[str]) -> np.ndarray:
    """CLIP tokens (with start and end) of each caption, as the prior pipeline pads them."""
    tok = enc.clip_tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="np")
    mask = np.asarray(tok["attention_mask"], dtype=bool)
    lengths = mask.sum(axis=1)
    if not (mask == (np.arange(mask.shape[1]) < lengths[:, None])).all():
        raise PipelineError(f"{enc.prior}: the CLIP tokenizer does not pad on the right; the cache "
                            "stores each caption's leading real tokens only")
    return lengths.astype(np.int64)


def build_cache(captions, images_root: str | Path, out_dir: str | Path, enc: Encoders, clip_image_size: int,
                resolution: int, batch_size: int = 32, dtype: str = "float32", workers: int = 1) -> dict:
    """Encode every row of ``captions`` (a DataFrame from extract) into ``out_dir``; resumable."""
    import pandas as pd

    out_dir, images_root = Path(out_dir), Path(images_root)
    _check_sizes(enc, clip_image_size, resolution)
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


FIELDS = IMAGE_ARRAYS + CAPTION_ARRAYS + ("text_hidden", "text_mask")  # what ``fetch`` hands out


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
    uncond = {f.stem[len("uncond_"):]: np.load(f) for f in sorted(path.glob("uncond_*.npy"))}
    return Cache(path=path, meta=meta, arrays=arrays, uncond=uncond, rows=np.load(path / "rows.npy"))
