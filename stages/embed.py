"""DVC stage `embed`: run the frozen encoders once per image and caption of a split.

Usage: python stages/embed.py EXTRACTED_DIR SPLIT CACHE_DIR
"""

import sys

import pandas as pd
import torch

from fashiondiff.config import load_params
from fashiondiff.data.split import select_split
from fashiondiff.embed.cache import build_cache, load_encoders
from fashiondiff.errors import PipelineError, cli


@cli
def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise PipelineError("usage: python stages/embed.py EXTRACTED_DIR SPLIT CACHE_DIR")
    extracted, split, out = argv
    params = load_params()
    torch.manual_seed(params.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    captions = pd.read_parquet(f"{extracted}/captions.parquet")
    captions = select_split(captions, split, params.data.holdout_fraction, params.seed)
    encoders = load_encoders(params.model.prior, params.model.decoder)
    build_cache(
        captions, extracted, out, encoders, clip_image_size=params.clip_image_size,
        resolution=params.model.resolution, batch_size=params.embed.batch_size, dtype=params.embed.dtype,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
