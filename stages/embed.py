"""DVC stage `embed`: run the frozen encoders once per image and caption of a split.

Usage: python stages/embed.py EXTRACTED_DIR SPLIT CACHE_DIR
Runs as is, or under `accelerate launch` (params compute.launcher): each process encodes a share
of the batches, process 0 writes the cache (docs/distributed.md).
"""

from __future__ import annotations

import argparse

import pandas as pd

from fashiondiff.config.view import stage_params
from fashiondiff.data.split import select_split
from fashiondiff.embed.encoders import load_encoders
from fashiondiff.embed.writer import build_cache
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads, seed_everything
from fashiondiff.spread import Ranks, stop_on_signals


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extracted", help="an extracted split (captions.parquet + images/)")
    parser.add_argument("split", choices=("train", "validation"), help="which rows to keep")
    parser.add_argument("out", help="cache folder to write")
    args = parser.parse_args(argv)
    with stop_on_signals():  # SIGTERM/SIGINT: stop, keep the finished batches
        limit_threads()
        params = stage_params("embed")
        seed_everything(params.seed)
        ranks = Ranks.start("embed", params.compute.timeout_s)
        captions = pd.read_parquet(f"{args.extracted}/captions.parquet")
        captions = select_split(captions, args.split, params.data.holdout_fraction, params.seed)
        encoders = load_encoders(params.model.prior, params.model.decoder, device=ranks.device)
        build_cache(
            captions, args.extracted, args.out, encoders, clip_image_size=params.clip_image_size,
            resolution=params.model.resolution, batch_size=params.embed.batch_size, dtype=params.embed.dtype,
            ranks=ranks,
        )
        ranks.close()


if __name__ == "__main__":
    main()
