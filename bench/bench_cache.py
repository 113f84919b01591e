"""Benchmark: the embedding cache's bytes per image at Kandinsky 2.1's real size, and the
data-fetch share of a cached training step, format 1 (reference) vs format 2 (ours).

Usage: python bench/bench_cache.py [--products 20000] [--batch 32] [--repeats 20]

1. Bytes per image, full size, float16. No encoder runs: the arrays of both layouts are
   allocated (``.npy`` files, headers included) with the shapes of the published 2.1
   networks (fashiondiff.models.published: CLIP ViT-L/14 width 768, M-CLIP XLM-R-large width
   1024, MoVQ 4 x 32 x 32 latents at 256 px) for a FashionGen-like catalogue:
   2 to 6 poses per product (mean 4), 10% of products reuse another product's title,
   (also none), CLIP title lengths of 2 + ceil(1.3 x words) tokens, words ~ 2 + Poisson(2.5)
   (FashionGen titles such as "Black Leather Chelsea Boots"). Also the worst case of
   77-token titles. Format 1 stored every text array per image, all 77 positions.
2. Data fetch: the tiny embedded models (bench_train's set-up), the same batches fetched
   from a format 1 cache (the per-image arrays written out) and from format 2
   (``Cache.fetch``: gathers captions, pads CLIP states back), as a share of the cached
   training step (fetch + loss + backward + AdamW), interleaved in the same run. Plus
   the fetch alone at full size (random float16 arrays of the real shapes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import setup, timed  # noqa: E402

from fashiondiff.cache.format import FORMAT_VERSION, TEXT_LENGTH
from fashiondiff.cache.reader import Cache  # noqa: E402
from fashiondiff.models.published import MOVQ as FULL_MOVQ  # noqa: E402
from fashiondiff.models.published import PRIOR as FULL_PRIOR
from fashiondiff.models.published import UNET as FULL_UNET
from fashiondiff.train.batch import to_tensor as _tensor  # noqa: E402
from fashiondiff.train.decoder import DecoderTask  # noqa: E402
from fashiondiff.train.draws import SampleDraws  # noqa: E402
from fashiondiff.train.prior import PriorTask  # noqa: E402

RESOLUTION = 256
CLIP_WIDTH = FULL_PRIOR["embedding_dim"]  # CLIP text hidden size = projection dim = prior width
MCLIP_WIDTH = FULL_UNET["encoder_hid_dim"]
LATENT = (FULL_MOVQ["latent_channels"], RESOLUTION // 8, RESOLUTION // 8)


def catalogue(products: int, seed: int = 0, title_tokens: int | None = None, share: float = 0.10):
    """Poses per product, caption index per image, CLIP tokens per unique caption."""
    rng = np.random.default_rng(seed)
    poses = rng.choice([2, 3, 4, 5, 6], size=products, p=[0.1, 0.2, 0.4, 0.2, 0.1])
    title = np.arange(products)
    shared = rng.random(products) < share
    idx = np.flatnonzero(shared)
    title[idx] = (rng.random(len(idx)) * idx).astype(np.int64)  # an earlier product's title
    while not np.array_equal(title, title[title]):  # resolve chains to the first product
        title = title[title]
    unique, caption_of_product = np.unique(title, return_inverse=True)
    caption = np.repeat(caption_of_product, poses)
    words = 2 + rng.poisson(2.5, size=len(unique))
    lengths = np.minimum(2 + np.ceil(1.3 * words), TEXT_LENGTH).astype(np.int64)
    if title_tokens is not None:
        lengths[:] = title_tokens
    return caption, lengths


def layouts(caption: np.ndarray, lengths: np.ndarray, dtype: str = "float16") -> dict[str, dict]:
    """name -> (shape, dtype) of every file of each format (rows first)."""
    n, c, t = len(caption), len(lengths), int(lengths.sum())
    f = np.dtype(dtype)
    common = {"latents": ((n, *LATENT), f), "image_embeds": ((n, CLIP_WIDTH), f), "rows": ((n,), np.int64)}
    uncond = {
        "uncond_text_embeds": ((1, CLIP_WIDTH), f),
        "uncond_text_hidden": ((1, TEXT_LENGTH, CLIP_WIDTH), f),
        "uncond_text_mask": ((1, TEXT_LENGTH), np.bool_),
        "uncond_mclip_embeds": ((1, CLIP_WIDTH), f),
        "uncond_mclip_hidden": ((1, TEXT_LENGTH, MCLIP_WIDTH), f),
        "uncond_mclip_mask": ((1, TEXT_LENGTH), np.bool_),
        "uncond_image_embeds": ((1, CLIP_WIDTH), f),
    }
    old = {
        **common,
        **uncond,
        "text_embeds": ((n, CLIP_WIDTH), f),
        "text_hidden": ((n, TEXT_LENGTH, CLIP_WIDTH), f),
        "text_mask": ((n, TEXT_LENGTH), np.bool_),
        "mclip_embeds": ((n, CLIP_WIDTH), f),
        "mclip_hidden": ((n, TEXT_LENGTH, MCLIP_WIDTH), f),
        "mclip_mask": ((n, TEXT_LENGTH), np.bool_),
    }
    new = {
        **common,
        **uncond,
        "caption": ((n,), np.int32),
        "text_embeds": ((c, CLIP_WIDTH), f),
        "mclip_embeds": ((c, CLIP_WIDTH), f),
        "mclip_hidden": ((c, TEXT_LENGTH, MCLIP_WIDTH), f),
        "text_hidden": ((t, CLIP_WIDTH), f),
        "text_offsets": ((c + 1,), np.int64),
    }
    return {"format 1": old, f"format {FORMAT_VERSION}": new}


def folder_bytes(root: Path, files: dict) -> int:
    """Allocate every array as a (sparse) .npy file; the folder's size in bytes, headers included."""
    root.mkdir(parents=True)
    for name, (shape, dtype) in files.items():
        np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    return sum(p.stat().st_size for p in root.iterdir())


def bytes_per_image(products: int, tmp: Path) -> dict:
    out = {}
    cases = {
        "FashionGen-like titles": {},
        "no title shared": {"share": 0.0},
        "worst case: 77-token titles": {"title_tokens": TEXT_LENGTH},
    }
    for label, kwargs in cases.items():
        caption, lengths = catalogue(products, **kwargs)
        sizes = {
            fmt: folder_bytes(tmp / f"{label[:5]}-{fmt[-1]}", files) / len(caption)
            for fmt, files in layouts(caption, lengths).items()
        }
        out[label] = {
            "images": len(caption),
            "unique_captions": len(lengths),
            "images_per_caption": len(caption) / len(lengths),
            "mean_clip_tokens": float(lengths.mean()),
            **sizes,
        }
    return out


def write_format_1(cache: Cache, root: Path) -> dict[str, np.ndarray]:
    """The same cache in format 1's per-image layout (memory-mapped, as training read it)."""
    root.mkdir()
    everything = cache.fetch(np.arange(len(cache)))
    for name, value in everything.items():
        np.save(root / f"{name}.npy", value)
    return {name: np.load(root / f"{name}.npy", mmap_mode="r") for name in everything}


def fetch_share(tmp: Path, batch: int, repeats: int) -> dict:
    captions, _, cache = setup(tmp, n_products=max(16, batch))
    old_arrays = write_format_1(cache, tmp / "format1")
    base = tmp / "base"
    from fashiondiff.models.loader import load_decoder, load_prior

    prior, decoder = load_prior(str(base / "prior")), load_decoder(str(base / "decoder"))
    tasks = {
        "prior": PriorTask(prior.prior, prior.scheduler, cache, 0.1),
        "decoder": DecoderTask(decoder.unet, decoder.scheduler, cache, 0.5, 0.1),
    }
    cpu = torch.device("cpu")
    rng = np.random.default_rng(0)
    out = {}
    for name, task in tasks.items():
        fields = list(task.batch(np.arange(2), cpu))
        opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-4)

        def old_fetch(index):
            return {k: _tensor(old_arrays[k][index], cpu) for k in fields}

        def step(b, s):
            loss = task.loss(task.model, b, SampleDraws(0, s, np.arange(len(next(iter(b.values())))), cpu))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        f_old, f_new, steps = [], [], []
        for s in range(repeats + 2):
            index = np.sort(rng.choice(len(cache), size=batch, replace=False))
            t_old = timed(lambda: old_fetch(index))
            t_new = timed(lambda: task.batch(index, cpu))
            b = task.batch(index, cpu)
            t_step = timed(lambda: step(b, s))
            if s >= 2:
                f_old.append(t_old), f_new.append(t_new), steps.append(t_step)
        mo, mn, ms = (statistics.median(x) for x in (f_old, f_new, steps))
        out[name] = {
            "fetch_ms_format1": 1000 * mo,
            "fetch_ms_format2": 1000 * mn,
            "compute_ms": 1000 * ms,
            "data_share_format1": mo / (mo + ms),
            "data_share_format2": mn / (mn + ms),
        }
    return out


def full_size_fetch(tmp: Path, batch: int, repeats: int, products: int = 160) -> dict:
    """Fetch time of one batch at full size (random float16 data), both layouts."""
    caption, lengths = catalogue(products)
    rng = np.random.default_rng(1)
    out = {}
    for fmt, files in layouts(caption, lengths).items():
        root = tmp / f"full{fmt[-1]}"
        root.mkdir(parents=True)
        for name, (shape, dtype) in files.items():
            if name.startswith("uncond_"):
                continue
            arr = np.lib.format.open_memmap(root / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            if name == "caption":
                arr[:] = caption
            elif name == "text_offsets":
                arr[:] = np.concatenate([[0], np.cumsum(lengths)])
            elif name == "text_mask":
                arr[:] = np.arange(TEXT_LENGTH) < lengths[caption][:, None]
            elif np.dtype(dtype).kind == "f":
                arr[:] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
            arr.flush()
        out[fmt] = root
    arrays = {fmt: {p.stem: np.load(p, mmap_mode="r") for p in root.glob("*.npy")} for fmt, root in out.items()}
    new = Cache(path=out["format 2"], meta={}, arrays=arrays["format 2"], uncond={}, rows=np.arange(len(caption)))
    names = ("latents", "image_embeds", "text_embeds", "text_hidden", "text_mask", "mclip_embeds", "mclip_hidden")
    t1, t2 = [], []
    for _ in range(repeats):
        index = np.sort(rng.choice(len(caption), size=batch, replace=False))
        t1.append(timed(lambda: {k: _tensor(arrays["format 1"][k][index], "cpu") for k in names}))
        t2.append(timed(lambda: {k: _tensor(v, "cpu") for k, v in new.fetch(index, names).items()}))
    return {"fetch_ms_format1": 1000 * statistics.median(t1), "fetch_ms_format2": 1000 * statistics.median(t2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=20000, help="catalogue size for the bytes figure")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report["bytes_per_image_float16_256px"] = sizes = bytes_per_image(args.products, tmp / "sizes")
        print(f"cache bytes per image, full size, float16, {args.products} products:")
        for label, s in sizes.items():
            old, new = s["format 1"], s[f"format {FORMAT_VERSION}"]
            print(
                f"  {label:28s} {s['images']} images, {s['images_per_caption']:.2f} images/caption, "
                f"{s['mean_clip_tokens']:.1f} CLIP tokens: format 1 {old / 1024:6.1f} KiB | "
                f"format {FORMAT_VERSION} {new / 1024:6.1f} KiB | x{old / new:.2f} smaller | "
                f"FashionGen train (260,490 images) {260490 * new / 2**30:.1f} GiB vs {260490 * old / 2**30:.1f} GiB"
            )
        report["data_fetch_tiny"] = shares = fetch_share(tmp / "tiny", args.batch, args.repeats)
        print(f"data fetch, tiny models, batch {args.batch} (format 1 is the reference, same run):")
        for name, s in shares.items():
            print(
                f"  {name:8s} fetch {s['fetch_ms_format1']:6.2f} ms -> {s['fetch_ms_format2']:6.2f} ms "
                f"(x{s['fetch_ms_format2'] / s['fetch_ms_format1']:.2f}) | share of a cached step "
                f"{100 * s['data_share_format1']:.1f}% -> {100 * s['data_share_format2']:.1f}% "
                f"(compute {s['compute_ms']:.1f} ms)"
            )
        report["data_fetch_full_size"] = full = full_size_fetch(tmp / "full", args.batch, args.repeats)
        print(
            f"data fetch, full-size float16 arrays, batch {args.batch}: format 1 {full['fetch_ms_format1']:.1f} ms"
            f" -> format 2 {full['fetch_ms_format2']:.1f} ms "
            f"(x{full['fetch_ms_format2'] / full['fetch_ms_format1']:.2f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
