"""``fashiondiff ui``: the MLflow UI, opened on the pipeline runs ready to compare.

Usage::

    fashiondiff ui                    # after `make repro`: prints the address to open
    fashiondiff ui --port 5001

It saves the experiment's "pipeline runs" view in MLflow (one row per pipeline run; the
params that differ between runs, ``lr`` always, and the headline metrics as columns), starts
``mlflow ui`` on ``mlflow.tracking_uri`` (params.yaml) and prints the view's address once
the server answers. With an http(s) tracking URI (a shared server) it only saves the view
and prints the address on that server.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.error
import urllib.request

from fashiondiff.errors import PipelineError

# The view's columns. Params: the method's rate, always (other params appear when they differ
# between runs). Metrics, as the pipeline's parent run names them (<stage>.<key in the stage's
# file>): reports/scores.json, the tuned model's three scores on both domains (README
# "Evaluation: what the numbers mean"), then the final training losses.
ALWAYS_PARAMS = ("lr",)
HEADLINE_METRICS = tuple(f"evaluate.{domain}.{metric}" for domain in ("catalogue", "generic")
                         for metric in ("clip_score", "r_precision", "fd_clip")) + (
    "train_prior.loss_last_epoch", "train_decoder.loss_last_epoch")
START_LIMIT_S = 120  # `mlflow ui` answers after ~15 s here


def add_parser(subparsers) -> None:
    """Register ``ui`` on the top-level CLI."""
    p = subparsers.add_parser(
        "ui", help="the MLflow UI, opened on the pipeline runs ready to compare",
        description="Start the MLflow UI on the pipeline's tracking store (params mlflow.tracking_uri) and "
                    "print the address of its runs, one row per pipeline run with the params that differ and "
                    "the headline metrics as columns. With an http(s) tracking URI, only print the address.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to bind (default 5000)")
    p.add_argument("--params", default="params.yaml", help="where mlflow.tracking_uri and mlflow.experiment are")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Save the view, start the server, print the address, serve until Ctrl-C."""
    if not 0 < args.port < 65536:
        raise PipelineError(f"--port must be in 1..65535, got {args.port}")
    from fashiondiff.config import load_params
    from fashiondiff.tracking import publish_runs_view, serve_ui, stop_process_group

    params = load_params(args.params)
    address = publish_runs_view(params, HEADLINE_METRICS, ALWAYS_PARAMS)
    uri = params.mlflow.tracking_uri
    if uri.startswith(("http://", "https://")):
        print(f"pipeline runs: {uri.rstrip('/')}/{address}")
        return
    root = f"http://{args.host}:{args.port}/"
    server = serve_ui(uri, args.host, args.port)
    # Ctrl-C (SIGINT) reaches only this process, the server runs in its own group: stop it here,
    # on SIGTERM too (`kill`, a test's teardown), so no server outlives the command.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        _wait_until_up(root, server)
        print(f"MLflow UI on {root} (Ctrl-C stops it). The pipeline runs, ready to compare:\n"
              f"  {root}{address}", flush=True)
        server.wait()
    finally:
        stop_process_group(server)


def _wait_until_up(url: str, server) -> None:
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PipelineError(f"`mlflow ui` exited with status {server.returncode} (is the port taken? try --port)")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise PipelineError(f"`mlflow ui` did not answer on {url} within {START_LIMIT_S} s")
