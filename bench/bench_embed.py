"""Benchmark: the embed stage's items/s and bytes per item, and what float16 storage changes.

Usage: python bench/bench_embed.py [--products 64]

In one run, on the same generated file and tiny model:
- reference: the cache built with images decoded in the main process (no loader worker);
- ours: images decoded and preprocessed in a DataLoader worker beside the encoders;
- float16: the same cache stored as float16, and the training losses it gives vs float32.
Also prints the bytes per item the real Kandinsky 2.1 encoders would produce.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fashiondiff.cache.reader import open_cache
from fashiondiff.data.extract import extract
from fashiondiff.embed.encoders import load_encoders
from fashiondiff.embed.writer import build_cache
from fashiondiff.models.loader import load_decoder, load_prior
from fashiondiff.standin.synthetic import write_synthetic
from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines
from fashiondiff.train.decoder import DecoderTask
from fashiondiff.train.draws import SampleDraws
from fashiondiff.train.prior import PriorTask


def real_bytes_per_item(resolution: int = 256, itemsize: int = 4) -> int:
    """CLIP ViT-L/14 (768), XLM-R large (1024) M-CLIP, MoVQ (4 ch, 8x down): one item's arrays."""
    floats = 768 * 3 + 77 * 768 + 1024 + 77 * 1024 + 4 * (resolution // 8) ** 2  # embeds, hidden, latents
    return floats * itemsize + 2 * 77  # + two bool masks


def losses(cache, base: Path) -> list[float]:
    prior = load_prior(str(base / "prior"))
    decoder = load_decoder(str(base / "decoder"))
    tasks = [
        PriorTask(prior.prior, prior.scheduler, cache, 0.1),
        DecoderTask(decoder.unet, decoder.scheduler, cache, 0.5, 0.1),
    ]
    out = []
    with torch.no_grad():
        for task in tasks:
            for i in range(0, len(cache), 32):
                index = np.arange(i, min(i + 32, len(cache)))
                out.append(
                    task.loss(
                        task.model, task.batch(index, torch.device("cpu")), SampleDraws(0, i, index, "cpu")
                    ).item()
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        h5 = write_synthetic(root / "train.h5", n_products=args.products, poses_per_product=4, seed=0)
        extract(h5, root / "x", "{name}", 256, 2)
        captions = pd.read_parquet(root / "x/captions.parquet")
        save_pipelines(build_tiny(captions["caption"].tolist(), TinySpec()), root / "base")
        enc = load_encoders(str(root / "base/prior"), str(root / "base/decoder"), device="cpu")
        runs = {}
        for name, workers, dtype in (("reference", 0, "float32"), ("ours", 1, "float32"), ("float16", 1, "float16")):
            start = time.perf_counter()
            summary = build_cache(
                captions, root / "x", root / name, enc, 224, 64, batch_size=32, dtype=dtype, workers=workers
            )
            runs[name] = (len(captions) / (time.perf_counter() - start), summary["bytes_per_item"])
        print(f"\n{len(captions)} items, tiny model, 64 px latents, 224 px CLIP")
        for name, (speed, size) in runs.items():
            print(f"{name:10s} {speed:7.1f} items/s  {size / 1024:7.1f} KiB/item")
        print(f"ours / reference items/s: x{runs['ours'][0] / runs['reference'][0]:.2f}")
        a = np.array(losses(open_cache(root / "ours"), root / "base"))
        b = np.array(losses(open_cache(root / "float16"), root / "base"))
        print(
            f"float16 cache: training loss relative difference max {np.max(np.abs(a - b) / a):.2e} "
            f"over {len(a)} batches (prior and decoder)"
        )
        for itemsize, label in ((4, "float32"), (2, "float16")):
            per = real_bytes_per_item(itemsize=itemsize)
            print(
                f"real 2.1 encoders, {label}: {per / 1024:.0f} KiB/item -> "
                f"{per * 260_490 / 2**30:.0f} GiB for FashionGen train, {per * 32_528 / 2**30:.1f} GiB "
                f"for its validation file"
            )


if __name__ == "__main__":
    main()
