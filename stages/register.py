"""DVC stage `register`: the tuned pipeline as an MLflow pyfunc model in the Model Registry.

Usage: python stages/register.py MODELS_DIR --train-prior FILE --train-decoder FILE --metrics FILE \
           --evaluation FILE

Gives the pipeline's parent run the scores of the stages that did not run under it (a cached
`dvc repro`), from their reports (the FILEs: fashiondiff.parent_scores). Logs MODELS_DIR/prior +
MODELS_DIR/decoder on this stage's MLflow run (under the pipeline's parent run) and registers a
new version of ``serve.registered_model``, when the pipeline is at most ``serve.max_log_mb``.
It writes no DVC output: run ids and versions are MLflow's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fashiondiff.config.view import stage_params
from fashiondiff.errors import cli
from fashiondiff.parent_scores import StageReports, log_parent_scores
from fashiondiff.runtime import limit_threads
from fashiondiff.serving.register import register
from fashiondiff.tracking import stage_run


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", help="folder with the tuned prior/ and decoder/")
    parser.add_argument("--train-prior", required=True, type=Path, metavar="FILE", help="train_prior's summary (JSON)")
    parser.add_argument(
        "--train-decoder", required=True, type=Path, metavar="FILE", help="train_decoder's summary (JSON)"
    )
    parser.add_argument("--metrics", required=True, type=Path, metavar="FILE", help="evaluate's metrics.json")
    parser.add_argument("--evaluation", required=True, type=Path, metavar="FILE", help="evaluate's evaluation.json")
    args = parser.parse_args(argv)
    limit_threads()
    params = stage_params("register")
    with stage_run("register", params) as tracker:
        log_parent_scores(tracker, StageReports(args.train_prior, args.train_decoder, args.metrics, args.evaluation))
        register(args.models_dir, params, tracker)


if __name__ == "__main__":
    main()
