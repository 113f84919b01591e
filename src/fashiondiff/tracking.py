"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

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

``tracker.log_model`` logs a pyfunc model on the stage's run and registers it in the
Model Registry, each version tagged with the pipeline's git commit and DVC experiment.

The experiment is tagged ``mlflow.experimentKind`` = ``custom_model_development``, the tag
MLflow 3's UI reads (where its "workflow-based navigation" is off) to show a training
experiment's runs table instead of the GenAI traces layout. ``publish_runs_view`` saves the
view a newcomer wants (one row per pipeline run, the params that differ and the headline
metrics as columns) as an MLflow saved view and returns its address; ``serve_ui`` starts
``mlflow ui`` on the tracking store (``fashiondiff ui``).

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
from typing import TYPE_CHECKING, Iterator, Sequence

from fashiondiff.config import Params, load_params
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
TAG_PIPELINE_RUN = "fashiondiff.pipeline_run"  # on model versions: the parent run's id
# MLflow 3's UI (mlflow/server/js/src/experiment-tracking/utils/ExperimentKindUtils.ts): a kind
# of "custom_model_development" shows the runs table ("Machine learning"), none the GenAI layout.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3's saved views (constants.ts, savedViewEnvelope.ts): an experiment tag
# "mlflow.sharedViewState.<id>" holding {"name", "createdAt", "state": JSON of the page's UI
# state}, opened by ...#/experiments/<id>/runs?viewStateShareKey=<id>. MLflow 3.17's UI takes
# its layout from the workflowType URL parameter (else the browser's last choice, else GenAI),
# no longer from the kind tag, so the address carries workflowType=machine_learning too.
TAG_VIEW_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_ID = "fashiondiff-runs"
RUNS_VIEW_NAME = "fashiondiff: pipeline runs"
_VALIDATION_FAILED = "Failed to validate serving input example"  # mlflow/models/model.py's warning

# MLflow's limits (mlflow/utils/validation.py); older servers are stricter, not looser.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
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
        self._client = client  # None: tracking is off, every method is a no-op
        self._last_step = 0

    @property
    def enabled(self) -> bool:
        """False when tracking is off: every method is a no-op."""
        return self._client is not None

    def log_params(self, params: dict) -> None:
        """Stage-specific params on the child run (values stringified, batched by 100)."""
        if self._client is not None:
            _log_params(self._client, self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Per-step values on the child run, in one request."""
        if self._client is not None:
            _log_metrics(self._client, self.run_id, metrics, step)
            self._last_step = max(self._last_step, int(step or 0))

    def log_curve(self, name: str, points: list[tuple[int, float]]) -> None:
        """A whole per-step curve at once, (step, value) pairs, in batched requests: for curves
        computed in another process (the stand-in's pre-training), logged when it is done."""
        if self._client is not None and points:
            _log_points(self._client, self.run_id, name, points)
            self._last_step = max(self._last_step, max(int(s) for s, _ in points))

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final values: on the child as given, on the parent prefixed ``<stage>.``.

        On the child they go at the last step logged, so that they are the run's
        latest value even for a key that also has a per-step curve.
        """
        if self._client is None:
            return
        _log_metrics(self._client, self.run_id, metrics, self._last_step)
        prefix = f"{self.stage}."
        up = {(k if k.startswith(prefix) else prefix + k): v for k, v in metrics.items()}
        _log_metrics(self._client, self.parent_run_id, up, None)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder, logged under ``artifact_path/`` keeping its own name."""
        if self._client is None:
            return
        path = Path(path)
        if path.is_dir():
            dest = posixpath.join(artifact_path, path.name) if artifact_path else path.name
            self._client.log_artifacts(self.run_id, str(path), artifact_path=dest)
        elif path.is_file():
            self._client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        else:
            raise PipelineError(f"{path}: no such file or folder to log to MLflow")

    def log_image(self, image: "PIL.Image.Image", name: str, parent_name: str = "") -> None:
        """An image as artifact ``name`` (``.png`` appended when it has no suffix); with
        ``parent_name``, on the pipeline's parent run too, as that (where a newcomer looks first;
        at the artifact root, MLflow's compare page shows it side by side across runs)."""
        if self._client is None:
            return
        for run_id, path in ((self.run_id, name), (self.parent_run_id, parent_name)):
            if path:
                path += "" if posixpath.splitext(path)[1] else ".png"
                self._client.log_image(run_id, image, artifact_file=path)

    def find_model_version(self, name: str, tag: str, value: str) -> str:
        """The newest version of registered model ``name`` tagged ``tag`` = ``value``, or ""."""
        if self._client is None:
            return ""
        from mlflow.exceptions import MlflowException

        try:
            versions = self._client.search_model_versions(f"name = '{name}'")
        except MlflowException as exc:
            raise PipelineError(f"mlflow ({_display(self.tracking_uri)}): cannot search model {name!r}: "
                                f"{exc.message.splitlines()[0]}") from exc
        found = [int(v.version) for v in versions if v.tags.get(tag) == value]
        return str(max(found)) if found else ""

    def log_model(self, code: str | Path, registered_name: str, tags: dict[str, str], **model) -> str:
        """Log a pyfunc model on this stage's run and register it; return its version.

        ``code`` is the file that builds the model (MLflow's models from code: nothing is
        pickled); ``model`` are ``mlflow.pyfunc.log_model``'s keywords (artifacts,
        signature, input_example, code_paths, pip_requirements, model_config). MLflow runs
        the input example through the logged model; if that fails, so does this call. The
        version is tagged with ``tags`` and the pipeline's git commit, DVC experiment, key
        and parent run. Tracking off: nothing is logged, the version is "".
        """
        if self._client is None:
            return ""
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        run_tags = self._client.get_run(self.run_id).data.tags
        tags = {**tags, **{k: run_tags[k] for k in (TAG_COMMIT, TAG_EXP_NAME, TAG_KEY) if k in run_tags},
                TAG_PIPELINE_RUN: self.parent_run_id}
        mlflow.set_tracking_uri(self.tracking_uri)  # Model.log and register_model use the global one
        try:
            with _failed_validation() as failures:
                info = Model.log(None, mlflow.pyfunc, name="model", run_id=self.run_id,
                                 python_model=str(code), **model)
            if failures:
                raise PipelineError(f"mlflow: the logged model fails its input example: {failures[0]}")
            version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
        except MlflowException as exc:
            raise PipelineError(f"mlflow ({_display(self.tracking_uri)}): cannot log or register model "
                                f"{registered_name!r}: {exc.message.splitlines()[0]}") from exc
        return str(version.version)


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


def publish_runs_view(params: Params, metrics: Sequence[str], always: Sequence[str],
                      tracking_uri: str | None = None) -> str:
    """Save the experiment's "pipeline runs" view in MLflow; return its address below the UI root.

    The view (an MLflow saved view, listed under *Views* on the runs page) shows one row per
    pipeline run (MLflow nests each stage's run under it, collapsed) with these columns: the
    params in ``always``, every other param whose value differs between the experiment's live
    pipeline runs (in params.yaml's order), and ``metrics`` as the parent run names them
    (``evaluate.catalogue.clip_score``). Written again at each call, so the columns
    follow the runs. No pipeline run yet: a PipelineError saying so.
    """
    _quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri or params.mlflow.tracking_uri)
    name = params.mlflow.experiment
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        runs = [] if exp is None or exp.lifecycle_stage != "active" else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'pipeline'")
        if not runs:
            raise PipelineError(f"mlflow ({_display(uri)}): experiment {name!r} has no pipeline run yet: "
                                f"run `make repro` first")
        keys = list(dict.fromkeys([*params.flat(), *sorted({k for r in runs for k in r.data.params})]))
        changed = [k for k in keys if k not in always and len({r.data.params.get(k) for r in runs}) > 1]
        state = _view_state([*always, *changed[:_VIEW_MAX_CHANGED]], metrics)
        envelope = {"name": RUNS_VIEW_NAME, "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        client.set_experiment_tag(exp.experiment_id, TAG_VIEW_PREFIX + RUNS_VIEW_ID, json.dumps(envelope))
        if TAG_EXPERIMENT_KIND not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    except MlflowException as exc:
        raise PipelineError(f"mlflow ({_display(uri)}): {exc.message.splitlines()[0]}") from exc
    return (f"#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_ID}")


def serve_ui(tracking_uri: str, host: str, port: int) -> subprocess.Popen:
    """Start ``mlflow ui`` (one worker) on a local tracking store, in a process group of its own
    (its server process has children): the caller waits for it and stops it with ``stop_process_group``."""
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "ui", "--backend-store-uri",
           resolve_tracking_uri(tracking_uri), "--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    try:
        return subprocess.Popen(cmd, env=env, start_new_session=True)
    except OSError as exc:
        raise PipelineError(f"cannot start `mlflow ui`: {exc}") from None


def stop_process_group(server: subprocess.Popen, grace_s: float = 15) -> None:
    """Stop a process started in a session of its own (``serve_ui``'s, a test's server) and its
    children: SIGTERM to its group, then SIGKILL after ``grace_s``."""
    import signal

    with contextlib.suppress(ProcessLookupError):  # the group, even if its leader has exited
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# -- internals ---------------------------------------------------------------------------

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


def _open(stage: str, params: Params, uri: str):
    _quiet_mlflow()
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
        raise PipelineError(f"mlflow ({_display(uri)}): {exc.message.splitlines()[0]}") from exc
    print(f"mlflow: {stage} run {child.info.run_id} in pipeline run {parent_id} "
          f"({_display(uri)}, experiment {params.mlflow.experiment})", file=sys.stderr)
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
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED"
    if isinstance(exc, SystemExit) and exc.code in (0, None):
        return "FINISHED"
    return "FAILED"


def _quiet_mlflow() -> None:
    """No emoji run links, progress bars or INFO chatter (database migrations) from mlflow."""
    import logging

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _failed_validation() -> Iterator[list[str]]:
    """Collect MLflow's "input example failed" warnings: Model.log only logs them."""
    import logging

    failures: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith(_VALIDATION_FAILED):
                failures.append(text.rpartition("Got error: ")[2].splitlines()[0])

    logger, handler = logging.getLogger("mlflow.models.model"), Catch(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield failures
    finally:
        logger.removeHandler(handler)


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

    items = [Param(str(k), _text(v)) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_BATCH])


def _log_metrics(client, run_id: str, metrics: dict[str, float], step: int | None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH])


def _log_points(client, run_id: str, name: str, points: list[tuple[int, float]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(name, float(v), now, int(s)) for s, v in points]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_BATCH])


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


def _display(uri: str) -> str:
    """The URI without credentials, for messages."""
    return re.sub(r"//[^/@]*@", "//", uri)
