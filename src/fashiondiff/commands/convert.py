"""Convert a shop's catalogue, a folder of photos and a captions file, into one FashionGen-layout
HDF5 file that the pipeline reads like FashionGen's own (``data.files.train``/``validation``).

Usage::

    fashiondiff convert --images shop/photos --captions shop/captions.csv --out data/raw/shop.h5
    fashiondiff convert --images coco/val2017 --captions captions_val2017.json --out data/raw/coco.h5

The captions file is a .csv or .jsonl with columns file, caption (optional name, category,
product_id), or a .json of COCO captions. Rows that cannot be used are skipped and listed at
the end (at most 20 lines here, all of them in OUT.skipped.csv). Columns, the picture rule,
the text rules: docs/catalogue.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fashiondiff.errors import PipelineError

CLI_HELP = __doc__.replace("Usage::", "Examples:").replace("``", "")
OUT_SUFFIXES = (".h5", ".hdf5")


def add_parser(subparsers) -> None:
    """Register ``convert`` on the top-level CLI."""
    p = subparsers.add_parser(
        "convert",
        help="a folder of photos + a captions file -> a FashionGen-layout .h5",
        description=CLI_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", required=True, metavar="DIR", help="the folder the captions' file paths are in")
    p.add_argument(
        "--captions",
        required=True,
        metavar="FILE",
        help="a .csv or .jsonl (file, caption[, name, category, product_id]) or a COCO captions .json",
    )
    p.add_argument("--out", required=True, metavar="FILE.h5", help="the HDF5 file to write")
    p.add_argument("--workers", type=int, default=2, help="processes decoding the photos (default 2; 0: this process)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """``convert`` subcommand: convert, stopping cleanly on SIGTERM, and say what was written."""
    from fashiondiff.data.convert import convert
    from fashiondiff.spread import stop_on_signals

    if Path(args.out).suffix.lower() not in OUT_SUFFIXES:
        raise PipelineError(f"--out {args.out}: give an HDF5 file name ending in .h5")
    with stop_on_signals():
        done = convert(args.images, args.captions, args.out, workers=args.workers)
    print(
        f"wrote {done.out}: {done.rows} rows, {done.products} products, {len(done.skipped)} rows "
        f"skipped, {done.seconds:.1f} s"
    )
    if done.replaced:
        print(
            f"{done.replaced} rows had characters outside latin-1 (FashionGen's encoding), written "
            f"as their plain letters or '?' (docs/catalogue.md)"
        )
