"""Benchmark: a training step on the embedding cache vs a step that runs the frozen
encoders on every batch (as diffusers' Kandinsky training examples do), same models,
same batch, one process; plus the data-loading share of a cached step.

Usage: python bench/bench_train.py [--batch 32] [--repeats 20]

Prints, per model, the median step time of each variant and their ratio (the
reference is measured in the same run, interleaved, so machine noise cancels).
The models are the embedded tiny ones; the ratio on the real 2.1 weights differs
(see README: encoders are a larger share of the real model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fashiondiff.cache.reader import open_cache
from fashiondiff.data.extract import extract
from fashiondiff.embed.encoders import (
    clip_pixels,
    encode_images,
    encode_texts,
    load_encoders,
    movq_pixels,
)
from fashiondiff.embed.writer import build_cache
from fashiondiff.models.loader import load_decoder, load_prior
from fashiondiff.standin.synthetic import write_synthetic
from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines
from fashiondiff.train.decoder import DecoderTask
from fashiondiff.train.draws import SampleDraws
from fashiondiff.train.prior import PriorTask

RESOLUTION = 64


def setup(root: Path, n_products: int):
    h5 = write_synthetic(root / "train.h5", n_products=n_products, poses_per_product=4, seed=0)
    extract(h5, root / "extracted", "{name}", 256, 1)
    captions = pd.read_parquet(root / "extracted/captions.parquet")
    save_pipelines(build_tiny(captions["caption"].tolist(), TinySpec()), root / "base")
    enc = load_encoders(str(root / "base/prior"), str(root / "base/decoder"), device="cpu")
    build_cache(captions, root / "extracted", root / "cache", enc, 224, RESOLUTION, batch_size=32, workers=0)
    return captions, enc, open_cache(root / "cache")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the stages run on a CPU (see fashiondiff.errors)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captions, enc, cache = setup(root, n_products=max(8, args.batch // 2))
        from PIL import Image

        images = [Image.open(root / "extracted" / p).convert("RGB") for p in captions["image"]]
        index = np.arange(args.batch)
        texts = captions["caption"].tolist()[: args.batch]
        # Pixels prepared outside the timed step, as a DataLoader worker would (favours the reference).
        clip_px = clip_pixels(enc.image_processor, images[: args.batch], 224)
        movq_px = movq_pixels(images[: args.batch], RESOLUTION)

        prior_pipe = load_prior(str(root / "base/prior"))
        decoder_pipe = load_decoder(str(root / "base/decoder"))
        tasks = {
            "prior": PriorTask(prior_pipe.prior, prior_pipe.scheduler, cache, 0.1),
            "decoder": DecoderTask(decoder_pipe.unet, decoder_pipe.scheduler, cache, 0.5, 0.1),
        }
        cpu = torch.device("cpu")
        print(f"batch {args.batch}, {args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
        for name, task in tasks.items():
            opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-4)

            def train_on(batch, step):
                items = np.arange(len(next(iter(batch.values()))))
                loss = task.loss(task.model, batch, SampleDraws(0, step, items, cpu))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            def cached(step):
                train_on(task.batch(index, cpu), step)

            def on_the_fly(step):
                with torch.no_grad():  # frozen encoders, every batch
                    fresh = {**encode_texts(enc, texts), **encode_images(enc, clip_px, movq_px)}
                batch = {k: (v.float() if v.is_floating_point() else v) for k, v in fresh.items()}
                train_on({k: batch[k] for k in task.batch(index[:1], cpu)}, step)

            fetch = []
            a, b = [], []
            for step in range(args.repeats + 2):
                ta = timed(lambda: cached(step))
                tb = timed(lambda: on_the_fly(step))
                fetch.append(timed(lambda: task.batch(index, cpu)))
                if step >= 2:  # warm-up
                    a.append(ta)
                    b.append(tb)
            ma, mb, mf = statistics.median(a), statistics.median(b), statistics.median(fetch)
            print(
                f"{name:8s} cached step {1000 * ma:7.1f} ms | encoders-every-step {1000 * mb:7.1f} ms | "
                f"speed-up x{mb / ma:.2f} | data fetch {100 * mf / ma:.1f}% of the cached step"
            )


if __name__ == "__main__":
    sys.exit(main())
