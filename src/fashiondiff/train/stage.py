"""Entry point shared by the two training stages (paths come from dvc.yaml)."""

from __future__ import annotations

import argparse
import os

from fashiondiff.config.view import stage_params
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads, seed_everything


def parse_args(kind: str, argv: list[str]) -> argparse.Namespace:
    """The paths dvc.yaml's cmd passes, named as fashiondiff.train.run.TrainPaths's fields."""
    parser = argparse.ArgumentParser(
        prog=f"train_{kind}", description=f"fine-tune Kandinsky 2.1's {kind} on the embedding cache"
    )
    parser.add_argument("--cache", required=True, help="training embedding cache (from embed)")
    parser.add_argument("--val-cache", default=None, help="held-out cache, for the validation loss")
    parser.add_argument("--out", required=True, help="output pipeline folder")
    parser.add_argument("--checkpoints", required=True, help="persistent checkpoint folder")
    parser.add_argument(
        "--summary",
        required=True,
        help="JSON of the run's summary: final losses, steps (a plain output; MLflow has it too)",
    )
    parser.add_argument("--plot", required=True, help="CSV of the loss curve (DVC plots)")
    parser.add_argument(
        "--val-plot", default=None, help="CSV of the validation curve: loss and scores at each validation (DVC plots)"
    )
    parser.add_argument("--val-pictures", default=None, help="folder for the last validation's pictures")
    return parser.parse_args(argv)


@cli
def main(kind: str, argv: list[str]) -> None:
    from fashiondiff.tracking import stage_run
    from fashiondiff.train.run import TrainPaths, run_training

    args = parse_args(kind, argv)
    limit_threads()
    params = stage_params(f"train_{kind}")
    seed_everything(params.seed)
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`: rank 0 alone tracks
        os.environ["FASHIONDIFF_TRACKING"] = "off"
    with stage_run(f"train_{kind}", params) as tracker:
        run_training(kind, params, TrainPaths(**vars(args)), tracker)
