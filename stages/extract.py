"""DVC stage `extract`: one FashionGen-layout HDF5 file -> PNGs and a captions table.

Usage: python stages/extract.py INPUT.h5 OUTPUT_DIR
Writes OUTPUT_DIR/images/<row>.png and OUTPUT_DIR/captions.parquet.
"""

from __future__ import annotations

import argparse

from fashiondiff.config.view import stage_params
from fashiondiff.data.extract import extract
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="FashionGen-layout .h5 file")
    parser.add_argument("output", help="folder to write images/ and captions.parquet into")
    args = parser.parse_args(argv)
    limit_threads()
    data = stage_params("extract").data
    extract(args.input, args.output, data.caption, data.chunk_size, data.workers)


if __name__ == "__main__":
    main()
