"""DVC stage `embed`: run the frozen encoders once per image and caption of a split.

Usage: python stages/embed.py EXTRACTED_DIR SPLIT CACHE_DIR
"""

from __future__ import annotations

import argparse

import pandas as pd

from fashiondiff.config import seed_everything, stage_params
from fashiondiff.data.split import select_split
from fashiondiff.embed.cache import build_cache, load_encoders
from fashiondiff.errors import cli


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extracted", help="an extracted split (captions.parquet + images/)")
    parser.add_argument("split", choices=("train", "validation"), help="which rows to keep")
    parser.add_argument("out", help="cache folder to write")
    args = parser.parse_args(argv)
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
