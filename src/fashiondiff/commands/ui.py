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
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fashiondiff.config.whole import Params
from fashiondiff.errors import PipelineError, first_line
from fashiondiff.processes import start_group, stop_process_group, wait_until_up
from fashiondiff.tracking import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_ROLE,
    display_uri,
    quiet_mlflow,
    resolve_tracking_uri,
)

# The view's columns. Params: the method's rate, always (other params appear when they differ
# between runs). Metrics, as the pipeline's parent run names them (<stage>.<key in the stage's
# file>): reports/scores.json, the tuned model's three scores on both domains
# (docs/evaluation.md), then the final training losses, then the last
# validation's loss and scores (docs/monitoring.md; their curves and pictures: the stage's run).
ALWAYS_PARAMS = ("lr",)
HEADLINE_METRICS = tuple(
    f"evaluate.{domain}.{metric}"
    for domain in ("catalogue", "generic")
    for metric in ("clip_score", "r_precision", "fd_clip")
) + (
    "train_prior.loss_last_epoch",
    "train_decoder.loss_last_epoch",
    "train_prior.val_loss",
    "train_decoder.val_loss",
    "train_prior.val_clip_score",
    "train_decoder.val_clip_score",
    "train_prior.val_image_embed_cosine",
)
START_LIMIT_S = 120  # `mlflow ui` answers after ~15 s here

# MLflow 3's saved views (constants.ts, savedViewEnvelope.ts): an experiment tag
# "mlflow.sharedViewState.<id>" holding {"name", "createdAt", "state": JSON of the page's UI
# state}, opened by ...#/experiments/<id>/runs?viewStateShareKey=<id>. MLflow 3.17's UI takes
# its layout from the workflowType URL parameter (else the browser's last choice, else GenAI),
# no longer from the kind tag, so the address carries workflowType=machine_learning too.
TAG_VIEW_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_ID = "fashiondiff-runs"
RUNS_VIEW_NAME = "fashiondiff: pipeline runs"


def add_parser(subparsers) -> None:
    """Register ``ui`` on the top-level CLI."""
    p = subparsers.add_parser(
        "ui",
        help="the MLflow UI, opened on the pipeline runs ready to compare",
        description="Start the MLflow UI on the pipeline's tracking store (params mlflow.tracking_uri) and "
        "print the address of its runs, one row per pipeline run with the params that differ and "
        "the headline metrics as columns. With an http(s) tracking URI, only print the address.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to bind (default 5000)")
    p.add_argument("--params", default="params.yaml", help="where mlflow.tracking_uri and mlflow.experiment are")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Save the view, start the server, print the address, serve until Ctrl-C."""
    if not 0 < args.port < 65536:
        raise PipelineError(f"--port must be in 1..65535, got {args.port}")
    from fashiondiff.config.whole import load_params

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
        try:
            wait_until_up(root, server, START_LIMIT_S)
        except RuntimeError as exc:
            raise PipelineError(f"`mlflow ui` did not start ({exc}); is the port taken? try --port") from None
        print(
            f"MLflow UI on {root} (Ctrl-C stops it). The pipeline runs, ready to compare:\n  {root}{address}",
            flush=True,
        )
        server.wait()
    finally:
        stop_process_group(server)


def publish_runs_view(
    params: Params, metrics: Sequence[str], always: Sequence[str], tracking_uri: str | None = None
) -> str:
    """Save the experiment's "pipeline runs" view in MLflow; return its address below the UI root.

    The view (an MLflow saved view, listed under *Views* on the runs page) shows one row per
    pipeline run (MLflow nests each stage's run under it, collapsed) with these columns: the
    params in ``always``, every other param whose value differs between the experiment's live
    pipeline runs (in params.yaml's order), and ``metrics`` as the parent run names them
    (``evaluate.catalogue.clip_score``). Written again at each call, so the columns
    follow the runs. No pipeline run yet: a PipelineError saying so.
    """
    quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri or params.mlflow.tracking_uri)
    name = params.mlflow.experiment
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        runs = (
            []
            if exp is None or exp.lifecycle_stage != "active"
            else client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'pipeline'")
        )
        if not runs:
            raise PipelineError(
                f"mlflow ({display_uri(uri)}): experiment {name!r} has no pipeline run yet: run `make repro` first"
            )
        keys = list(dict.fromkeys([*params.flat(), *sorted({k for r in runs for k in r.data.params})]))
        changed = [k for k in keys if k not in always and len({r.data.params.get(k) for r in runs}) > 1]
        state = _view_state([*always, *changed[:_VIEW_MAX_CHANGED]], metrics)
        envelope = {"name": RUNS_VIEW_NAME, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        client.set_experiment_tag(exp.experiment_id, TAG_VIEW_PREFIX + RUNS_VIEW_ID, json.dumps(envelope))
        if TAG_EXPERIMENT_KIND not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    except MlflowException as exc:
        raise PipelineError(f"mlflow ({display_uri(uri)}): {first_line(exc)}") from exc
    return f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW_ID}"


def serve_ui(tracking_uri: str, host: str, port: int) -> subprocess.Popen:
    """Start ``mlflow ui`` (one worker) on a local tracking store, in a process group of its own
    (its server process has children): the caller waits for it and stops it with ``stop_process_group``."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_cli) if mlflow_cli.exists() else "mlflow",
        "ui",
        "--backend-store-uri",
        resolve_tracking_uri(tracking_uri),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    try:
        return start_group(cmd, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"})
    except OSError as exc:
        raise PipelineError(f"cannot start `mlflow ui`: {exc}") from None


# -- the view's state ------------------------------------------------------------

_VIEW_MAX_CHANGED = 12  # more differing params than this: the rest stay under *Columns*
# The runs table's own leading columns (ag-grid column ids in MLflow 3.17's bundle): listed
# first in columnOrder, which is also what makes the UI apply columnWidths at all.
_VIEW_LEADING = ("attributes.`Run Name`", "runDateAndNestInfo", "duration")
_PX_PER_CHAR, _PX_PADDING, _PX_MIN = 6.5, 40, 96  # 13 px header font; sort icon and padding


def _view_state(params: Sequence[str], metrics: Sequence[str]) -> dict:
    """The runs page's UI state (ExperimentPageUIState.tsx): the columns by their canonical keys
    ``params.`lr``` / ``metrics.`name``` (makeCanonicalSortKey), in this order (params first),
    each wide enough for its name."""
    columns = [f"params.`{k}`" for k in params] + [f"metrics.`{m}`" for m in metrics]
    widths = {col: max(_PX_MIN, round(_PX_PADDING + _PX_PER_CHAR * len(col.split("`")[1]))) for col in columns}
    return {"selectedColumns": columns, "columnOrder": [*_VIEW_LEADING, *columns], "columnWidths": widths}
