"""DVC stage `synthesize` (the stand-in): the embedded default's FashionGen-layout HDF5 files.

Usage: python stages/synthesize.py OUT_DIR
Writes the catalogue, OUT_DIR/fashiongen_{train,validation}.h5, and the generic domain the
embedded base generator is pre-trained on, OUT_DIR/generic_{train,validation}.h5.
"""

from __future__ import annotations

import argparse

from fashiondiff.config.view import stage_params
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads
from fashiondiff.standin.synthetic import synthesize


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the four .h5 files into")
    args = parser.parse_args(argv)
    limit_threads()
    params = stage_params("synthesize")
    paths = synthesize(args.out_dir, params.standin.synthetic, params.seed)
    print(f"synthesize: wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
