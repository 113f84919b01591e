"""MLflow tracking of the stages: one parent run per pipeline run, one nested child run per stage.

Usage, in a stage::

    with stage_run("train_prior", params) as tracker:
        tracker.log_metrics({"loss": loss}, step=step)     # per-step curve, on the child
        tracker.log_summary({"loss": final_loss})          # child, and parent as "train_prior.loss"

DVC runs every stage as its own process, so no process holds "the" parent run.
Stages find it instead: the parent carries the tag ``fashiondiff.pipeline_key``,
a hash of (all params of params.yaml, git commit, DVC experiment name, baseline
rev). Each stage searches the experiment for a live run with its key and creates
one if there is none. Two stages racing to create it resolve to the earliest run
(start time, then run id); the loser deletes its own. A stage that runs again under
the same key (``dvc repro --force``) soft-deletes its previous child, tagged
``fashiondiff.superseded_by``, so the parent shows one child per stage
(``mlflow runs restore`` brings one back; ``mlflow gc`` purges them).
Note what the key implies: a ``dvc repro`` after a param change makes a new parent
that only holds the stages DVC actually re-ran.

The parent's status follows the last stage that ran: RUNNING while a stage runs,
then that stage's FINISHED / FAILED / KILLED.

The experiment is tagged ``mlflow.experimentKind`` = ``custom_model_development``, the tag
MLflow 3's UI reads (where its "workflow-based navigation" is off) to show a training
experiment's runs table instead of the GenAI traces layout. The Model Registry is the
``register`` stage's (``fashiondiff.serving.registry``); the UI's saved view is
``fashiondiff ui``'s (``fashiondiff.commands.ui``).

``FASHIONDIFF_TRACKING=off`` turns every call into a no-op (mlflow is not imported).
Run ids are random: never write them (or anything else from here) into stage outputs.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import posixpath
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fashiondiff.config.schema import Params, load_params
from fashiondiff.errors import PipelineError

if TYPE_CHECKING:  # pragma: no cover
    import PIL.Image

ENV_SWITCH = "FASHIONDIFF_TRACKING"
TAG_KEY = "fashiondiff.pipeline_key"
TAG_ROLE = "fashiondiff.role"
TAG_STAGE = "fashiondiff.stage"
TAG_SUPERSEDED = "fashiondiff.superseded_by"
TAG_EXP_NAME = "dvc.exp_name"
TAG_BASELINE = "dvc.baseline_rev"
TAG_COMMIT = "mlflow.source.git.commit"
TAG_PARENT = "mlflow.parentRunId"
# MLflow 3's UI (mlflow/server/js/src/experiment-tracking/utils/ExperimentKindUtils.ts): a kind
# of "custom_model_development" shows the runs table ("Machine learning"), none the GenAI layout.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's limit on a param's value (mlflow/utils/validation.py); log_batch splits batches itself.
_MAX_PARAM_VALUE = 6000
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_.@:/-]+$")


def tracking_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


class Tracker:
    """Logs to one stage's child run (and, for summaries, to the pipeline's parent run)."""

    def __init__(self, stage: str, client=None, run_id: str = "", parent_run_id: str = "",
                 tracking_uri: str = "") -> None:
        self.stage = stage
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.tracking_uri = tracking_uri
        self.client = client  # None: tracking is off, every method is a no-op
        self._last_step = 0

    @property
    def enabled(self) -> bool:
        """False when tracking is off: every method is a no-op."""
        return self.client is not None

    def log_params(self, params: dict) -> None:
        """Stage-specific params on the child run (values stringified, batched by 100)."""
        if self.client is not None:
            _log_params(self.client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Per-step values on the child run, in one request."""
        if self.client is not None:
            _log_metrics(self.client, self.run_id, metrics, step)
            self._last_step = max(self._last_step, int(step or 0))

    def log_curve(self, name: str, points: list[tuple[int, float]]) -> None:
        """A whole per-step curve at once, (step, value) pairs, in batched requests: for curves
        computed in another process (the stand-in's pre-training), logged when it is done."""
        if self.client is not None and points:
            _log_points(self.client, self.run_id, [(name, s, v) for s, v in points])
            self._last_step = max(self._last_step, max(int(s) for s, _ in points))

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final values: on the child as given, on the parent prefixed ``<stage>.``.

        On the child they go at the last step logged, so that they are the run's
        latest value even for a key that also has a per-step curve.
        """
        if self.client is None:
            return
        _log_metrics(self.client, self.run_id, metrics, self._last_step)
        prefix = f"{self.stage}."
        up = {(k if k.startswith(prefix) else prefix + k): v for k, v in metrics.items()}
        _log_metrics(self.client, self.parent_run_id, up, None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder, logged under ``artifact_path/`` keeping its own name."""
        if self.client is None:
            return
        path = Path(path)
        if path.is_dir():
            dest = posixpath.join(artifact_path, path.name) if artifact_path else path.name
            self.client.log_artifacts(self.run_id, str(path), artifact_path=dest)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        else:
            raise PipelineError(f"{path}: no such file or folder to log to MLflow")

    def log_image(self, image: "PIL.Image.Image", name: str, parent_name: str = "") -> None:
        """An image as artifact ``name`` (``.png`` appended when it has no suffix); with
        ``parent_name``, on the pipeline's parent run too, as that (where a newcomer looks first;
        at the artifact root, MLflow's compare page shows it side by side across runs)."""
        if self.client is None:
            return
        for run_id, path in ((self.run_id, name), (self.parent_run_id, parent_name)):
            if path:
                path += "" if posixpath.splitext(path)[1] else ".png"
                self.client.log_image(run_id, image, artifact_file=path)

    def log_image_at(self, image: "PIL.Image.Image", key: str, step: int) -> None:
        """An image at a training step: MLflow 3's UI shows a run's images per ``key`` with a step
        slider (``MlflowClient.log_image(key=, step=)``; files under the run's ``images/``)."""
        if self.client is not None:
            self.client.log_image(self.run_id, image, key=key, step=int(step), synchronous=True)

@contextlib.contextmanager
def stage_run(stage: str, params, tracking_uri: str | None = None) -> Iterator[Tracker]:
    """Open ``stage``'s child run under the pipeline's parent run; end it with the block.

    ``params`` is the stage's view (its declared params go on the child run) or a whole
    Params. The parent run, its key and the ``mlflow.*`` settings come from the whole of
    ``params.yaml``: tracking shapes no DVC output, so no stage declares those keys.
    ``tracking_uri`` overrides ``mlflow.tracking_uri``. On an exception the
    child (and parent) end FAILED (KILLED on Ctrl-C) and the exception propagates.
    """
    if not _STAGE_NAME.match(stage):
        raise PipelineError(f"tracking: stage name {stage!r} has characters other than [A-Za-z0-9_.@:/-]")
    if not tracking_enabled():
        yield Tracker(stage)
        return
    whole = params if isinstance(params, Params) else load_params()
    uri = resolve_tracking_uri(tracking_uri or whole.mlflow.tracking_uri)
    client, tracker = _open(stage, whole, uri)
    if whole is not params:
        tracker.log_params(params.flat())  # what this stage declares, beside the parent's whole set
    try:
        yield tracker
    except BaseException as exc:
        _close(client, tracker, _status_for(exc))
        raise
    _close(client, tracker, "FINISHED")


def resolve_tracking_uri(uri: str, cwd: str | Path | None = None) -> str:
    """Make a relative ``sqlite:///path`` absolute against ``cwd`` (default: the current one)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return prefix + str((Path(cwd or os.getcwd()) / path).resolve())
    return uri


def pipeline_identity(params: Params, cwd: str | Path | None = None) -> dict[str, str]:
    """What makes two stage processes part of the same pipeline run, and its hash ``key``.

    ``dvc exp run`` exports DVC_EXP_NAME and DVC_EXP_BASELINE_REV to its stages
    (dvc/repo/experiments/queue/base.py); ``dvc repro`` exports only DVC_ROOT and
    DVC_STAGE; a stage run by hand has neither.
    """
    root = os.environ.get("DVC_ROOT") or str(cwd or os.getcwd())
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    exp_name = os.environ.get("DVC_EXP_NAME") or ("repro" if "DVC_STAGE" in os.environ else "local")
    identity = {
        "commit": baseline or _git_commit(root),
        "baseline_rev": baseline,
        "exp_name": exp_name,
    }
    flat = {k: _text(v) for k, v in params.flat().items()}
    blob = json.dumps({"params": flat, **identity}, sort_keys=True)
    identity["key"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return identity


# -- internals ---------------------------------------------------------------------------

def _open(stage: str, params: Params, uri: str):
    quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    identity = pipeline_identity(params)
    try:
        client = MlflowClient(tracking_uri=uri)
        exp_id = _experiment(client, params.mlflow.experiment, uri)
        parent_id = _parent(client, exp_id, identity)
        _log_params(client, parent_id, params.flat())  # idempotent: same key, same values
        child = client.create_run(exp_id, run_name=stage, tags={
            TAG_PARENT: parent_id, TAG_ROLE: "stage", TAG_STAGE: stage, TAG_KEY: identity["key"],
            TAG_COMMIT: identity["commit"], TAG_EXP_NAME: identity["exp_name"], "mlflow.user": _user(),
        })
        _supersede(client, exp_id, parent_id, stage, keep=child.info.run_id)
        client.update_run(parent_id, status="RUNNING")
    except MlflowException as exc:
        raise PipelineError(f"mlflow ({display_uri(uri)}): {exc.message.splitlines()[0]}") from exc
    print(f"mlflow: {stage} run {child.info.run_id} in pipeline run {parent_id} "
          f"({display_uri(uri)}, experiment {params.mlflow.experiment})", file=sys.stderr)
    return client, Tracker(stage, client, child.info.run_id, parent_id, uri)


def _close(client, tracker: Tracker, status: str) -> None:
    """End child then parent; while an exception is propagating, never mask it."""
    try:
        client.set_terminated(tracker.run_id, status=status)
        client.set_terminated(tracker.parent_run_id, status=status)
    except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not hide the stage's error
        if status == "FINISHED":
            raise
        print(f"mlflow: could not mark run {tracker.run_id} {status}: {exc!r}", file=sys.stderr)


def _status_for(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", 0) > 128:  # a signal stopped it
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED"


def quiet_mlflow() -> None:
    """No emoji run links, progress bars or INFO chatter (database migrations) from mlflow."""
    import logging

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another stage process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise PipelineError(f"mlflow: experiment {name!r} is deleted; restore it "
                            f"(mlflow experiments restore) or purge it (mlflow gc)")
    if TAG_EXPERIMENT_KIND not in exp.tags:  # a kind chosen in the UI is left alone
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return exp.experiment_id


def _artifact_location(uri: str) -> str | None:
    """sqlite without a server: ``mlartifacts/`` beside the database; servers: their default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        return (db.parent / "mlartifacts").as_uri()
    return None


def _parent(client, exp_id: str, identity: dict[str, str]) -> str:
    found = _parents(client, exp_id, identity["key"])
    if found:
        return found[0]
    run_name = identity["exp_name"]
    if "DVC_EXP_NAME" not in os.environ:
        run_name = f"{run_name}-{identity['key'][:8]}"
    tags = {TAG_KEY: identity["key"], TAG_ROLE: "pipeline", TAG_COMMIT: identity["commit"],
            TAG_EXP_NAME: identity["exp_name"], "mlflow.user": _user()}
    if identity["baseline_rev"]:
        tags[TAG_BASELINE] = identity["baseline_rev"]
    mine = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    # Race: every process applies the same rule (earliest wins) to what it sees after creating.
    winner = (_parents(client, exp_id, identity["key"]) or [mine])[0]
    if winner != mine:
        client.delete_run(mine)
    return winner


def _parents(client, exp_id: str, key: str) -> list[str]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' "
                              f"and tags.`{TAG_ROLE}` = 'pipeline'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


def _supersede(client, exp_id: str, parent_id: str, stage: str, keep: str) -> None:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' "
                              f"and tags.`{TAG_STAGE}` = '{stage}'")
    for run in runs:
        if run.info.run_id == keep:
            continue
        client.set_tag(run.info.run_id, TAG_SUPERSEDED, keep)
        if run.info.status == "RUNNING":  # its process died without ending it
            client.set_terminated(run.info.run_id, status="KILLED")
        client.delete_run(run.info.run_id)


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(str(k), _text(v)) for k, v in params.items()])


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int | None) -> None:
    _log_points(client, run_id, [(k, int(step or 0), v) for k, v in metrics.items()])


def _log_points(client, run_id: str, points: list[tuple[str, int, float]]) -> None:
    """(name, step, value) points in one call: MlflowClient.log_batch splits it into MLflow's batch sizes."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(name, float(v), now, int(step)) for name, step, v in points])


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[:_MAX_PARAM_VALUE - 3] + "..."


def _git_commit(root: str) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


def display_uri(uri: str) -> str:
    """The URI without credentials, for messages."""
    return re.sub(r"//[^/@]*@", "//", uri)
