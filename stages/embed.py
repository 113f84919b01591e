"""DVC stage `embed`: run the frozen encoders once per image and caption of a split.

Usage: python stages/embed.py EXTRACTED_DIR SPLIT CACHE_DIR
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


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extracted", help="an extracted split (captions.parquet + images/)")
    parser.add_argument("split", choices=("train", "validation"), help="which rows to keep")
    parser.add_argument("out", help="cache folder to write")
    args = parser.parse_args(argv)
    limit_threads()
    params = stage_params("embed")
    seed_everything(params.seed)
    captions = pd.read_parquet(f"{args.extracted}/captions.parquet")
    captions = select_split(captions, args.split, params.data.holdout_fraction, params.seed)
    encoders = load_encoders(params.model.prior, params.model.decoder)
    build_cache(
        captions, args.extracted, args.out, encoders, clip_image_size=params.clip_image_size,
        resolution=params.model.resolution, batch_size=params.embed.batch_size, dtype=params.embed.dtype,
    )


if __name__ == "__main__":
    main()
