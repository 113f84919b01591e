"""DVC stage `synthesize` (the stand-in): the embedded default's FashionGen-layout HDF5 files.

Usage: python stages/synthesize.py OUT_DIR
Writes OUT_DIR/fashiongen_train.h5 and OUT_DIR/fashiongen_validation.h5.
"""

from __future__ import annotations

import argparse

from fashiondiff.config import stage_params
from fashiondiff.embedded.synthetic import synthesize
from fashiondiff.errors import cli


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the two .h5 files into")
    args = parser.parse_args(argv)
    params = stage_params("synthesize")
    s = params.embedded.synthetic
    paths = synthesize(args.out_dir, s.train_products, s.validation_products,
                       s.poses_per_product, params.seed)
    print(f"synthesize: wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
