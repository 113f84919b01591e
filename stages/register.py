"""DVC stage `register`: the tuned pipeline as an MLflow pyfunc model in the Model Registry.

Usage: python stages/register.py MODELS_DIR

Logs MODELS_DIR/prior + MODELS_DIR/decoder on this stage's MLflow run (under the pipeline's
parent run) and registers a new version of ``serve.registered_model``, when the pipeline is
at most ``serve.max_log_mb``. It writes no DVC output: run ids and versions are MLflow's.
"""

from __future__ import annotations

import argparse

from fashiondiff.config.view import stage_params
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads
from fashiondiff.serving.register import register
from fashiondiff.tracking import stage_run


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models_dir", help="folder with the tuned prior/ and decoder/")
    args = parser.parse_args(argv)
    limit_threads()
    params = stage_params("register")
    with stage_run("register", params) as tracker:
        register(args.models_dir, params, tracker)


if __name__ == "__main__":
    main()
