"""The command line: ``fashiondiff <command> ...`` (or ``python -m fashiondiff <command> ...``).

Usage::

    fashiondiff --help
    fashiondiff generate "black leather mini skirt" --model models --out skirt.png
    fashiondiff serve                # the web page, http://127.0.0.1:7860
    fashiondiff ui                   # the MLflow UI on the pipeline runs, http://127.0.0.1:5000
    fashiondiff run paper --dry      # a preset (presets/paper.yaml) as one DVC experiment: the plan
    fashiondiff convert --images shop/photos --captions shop/captions.csv --out data/raw/shop.h5
    fashiondiff sweep-one sweep.yaml 3   # one experiment of a sweep in a clone of its own, pushed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fashiondiff import __version__
from fashiondiff.commands import convert, generate, run, serve, sweep, ui
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashiondiff",
        description="Kandinsky 2.1 fine-tuned on FashionGen: generate images from the trained models, "
        "serve them, or look at the pipeline runs in MLflow.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    generate.add_parser(commands)
    run.add_parser(commands)
    serve.add_parser(commands)
    ui.add_parser(commands)
    convert.add_parser(commands)
    sweep.add_parser(commands)
    return parser


@cli
def main(argv: Sequence[str] | None = None) -> int:
    limit_threads()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
