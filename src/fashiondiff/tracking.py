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
Note what the key implies: a ``dvc repro`` after a param change or a commit makes a new
parent whose child runs are the stages DVC actually re-ran. Its scores are complete all the
same: ``register``, which runs every time, logs the summaries of the stages that did not run
under it, from their reports (``Tracker.log_parent_summary``, ``fashiondiff.parent_scores``).

The parent's status follows the last stage that ran: RUNNING while a stage runs,
then that stage's FINISHED / FAILED / KILLED.

The experiment is tagged ``mlflow.experimentKind`` = ``custom_model_development``, the tag
MLflow 3's UI reads (where its "workflow-based navigation" is off) to show a training
experiment's runs table instead of the GenAI traces layout. The Model Registry is the
``register`` stage's (``fashiondiff.serving.registry``); the UI's saved view is
``fashiondiff ui``'s (``fashiondiff.commands.ui``).

Where the runs go: ``mlflow.tracking_uri``, a relative ``sqlite:///`` path resolved against the
project's root (``DVC_ROOT``: a queued ``dvc exp run`` runs in a temporary copy DVC deletes).
Opening a stage's runs needs the store (retried up to ``FASHIONDIFF_TRACKING_START_S`` seconds,
then a one-line error before any work); every later call goes through an outbox a background
thread delivers, so a store that goes away mid-run delays nothing (fashiondiff.outbox).

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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fashiondiff.config.schema import flatten, read_params_file
from fashiondiff.config.tracking import MlflowParams
from fashiondiff.config.view import ParamsView, validated
from fashiondiff.errors import PipelineError, first_line
from fashiondiff.outbox import (
    FLUSH_S,
    RETRY_S,
    Outbox,
    fast_failing_requests,
    is_transient,
    seconds,
    send,
    store_lock,
)
from fashiondiff.project import project_root

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


def parent_keys(stage: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` as the pipeline's parent run holds a stage's summary: ``<stage>.<key>``."""
    prefix = f"{stage}."
    return {k if k.startswith(prefix) else prefix + k: v for k, v in metrics.items()}


class Tracker:
    """Logs to one stage's child run (and, for summaries, to the pipeline's parent run).

    Every call returns at once: it becomes an op of the stage's :class:`~fashiondiff.outbox.Outbox`,
    which a background thread delivers (retried while the store does not answer; see there).
    ``client`` stays usable for what needs an answer now (the register stage's registry calls).
    """

    def __init__(
        self, stage: str, client=None, run_id: str = "", parent_run_id: str = "", tracking_uri: str = "", outbox=None
    ) -> None:
        self.stage = stage
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.tracking_uri = tracking_uri
        self.client = client  # None: tracking is off, every method is a no-op
        self.outbox = outbox  # None with a client: each call is sent before it returns
        self._last_step = 0

    @property
    def enabled(self) -> bool:
        """False when tracking is off: every method is a no-op."""
        return self.client is not None

    def log_params(self, params: dict) -> None:
        """Stage-specific params on the child run (values stringified, batched by 100)."""
        if self.client is not None:
            self._put({"op": "params", "run": self.run_id, "params": {str(k): _text(v) for k, v in params.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Per-step values on the child run, in one request."""
        if self.client is not None:
            self._points(self.run_id, [(k, int(step or 0), v) for k, v in metrics.items()])
            self._last_step = max(self._last_step, int(step or 0))

    def log_curve(self, name: str, points: list[tuple[int, float]]) -> None:
        """A whole per-step curve at once, (step, value) pairs, in batched requests: for curves
        computed in another process (the stand-in's pre-training), logged when it is done."""
        if self.client is not None and points:
            self._points(self.run_id, [(name, s, v) for s, v in points])
            self._last_step = max(self._last_step, max(int(s) for s, _ in points))

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Final values: on the child as given, on the parent prefixed ``<stage>.``.

        On the child they go at the last step logged, so that they are the run's
        latest value even for a key that also has a per-step curve.
        """
        if self.client is None:
            return
        self._points(self.run_id, [(k, self._last_step, v) for k, v in metrics.items()])
        self._points(self.parent_run_id, [(k, 0, v) for k, v in parent_keys(self.stage, metrics).items()])

    def log_parent_summary(self, stage: str, metrics: dict[str, float]) -> list[str]:
        """Another stage's final values, on the parent as that stage's ``log_summary`` puts them
        (``<stage>.<key>``), each key the parent lacks; returns the keys logged.

        For a parent run the stage did not run under: a ``dvc repro`` that finds it up to date
        runs the always-changed ``register`` alone, under a new parent (a new commit or params
        give a new pipeline key). A parent where the stage ran keeps its values untouched.
        """
        if self.client is None:
            return []
        have = self.client.get_run(self.parent_run_id).data.metrics  # an answer now, as registry calls
        missing = {k: v for k, v in parent_keys(stage, metrics).items() if k not in have}
        if missing:
            self._points(self.parent_run_id, [(k, 0, v) for k, v in missing.items()])
        return sorted(missing)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder, logged under ``artifact_path/`` keeping its own name."""
        if self.client is None:
            return
        path = Path(path)
        if path.is_dir():
            dest = posixpath.join(artifact_path, path.name) if artifact_path else path.name
        elif path.is_file():
            dest = artifact_path
        else:
            raise PipelineError(f"{path}: no such file or folder to log to MLflow")
        self._put({"op": "artifact", "run": self.run_id, "path": str(path.resolve()), "artifact_path": dest})

    def log_image(self, image: PIL.Image.Image, name: str, parent_name: str = "") -> None:
        """An image as artifact ``name`` (``.png`` appended when it has no suffix); with
        ``parent_name``, on the pipeline's parent run too, as that (where a newcomer looks first;
        at the artifact root, MLflow's compare page shows it side by side across runs)."""
        if self.client is None:
            return
        for run_id, path in ((self.run_id, name), (self.parent_run_id, parent_name)):
            if path:
                path += "" if posixpath.splitext(path)[1] else ".png"
                self._image(run_id, image, artifact_file=path)

    def log_image_at(self, image: PIL.Image.Image, key: str, step: int) -> None:
        """An image at a training step: MLflow 3's UI shows a run's images per ``key`` with a step
        slider (``MlflowClient.log_image(key=, step=)``; files under the run's ``images/``)."""
        if self.client is not None:
            self._image(self.run_id, image, key=key, step=int(step))

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until every call so far is delivered; True if it was."""
        return self.outbox is None or self.outbox.flush(timeout)

    # -- how calls reach the store ---------------------------------------------------------

    def _put(self, op: dict) -> None:
        if self.outbox is not None:
            self.outbox.put(op)
        else:
            send(self.client, op)

    def _points(self, run_id: str, points: list[tuple[str, int, float]]) -> None:
        """(name, step, value) points, stamped now (a delayed delivery keeps when they happened)."""
        now = int(time.time() * 1000)
        self._put({"op": "metrics", "run": run_id, "points": [[k, float(v), now, int(s)] for k, s, v in points]})

    def _image(
        self, run_id: str, image, artifact_file: str | None = None, key: str | None = None, step: int | None = None
    ) -> None:
        """``image`` as ``artifact_file``, or as MLflow's stepped image ``key`` at ``step``."""
        if self.outbox is None:
            self.client.log_image(run_id, image, artifact_file=artifact_file, key=key, step=step, synchronous=True)
            return
        path = self.outbox.stage_image(image, posixpath.basename(artifact_file or f"{key}.png"))
        op = {"op": "image", "run": run_id, "path": path}
        op.update(
            {"artifact_file": artifact_file}
            if key is None
            else {"key": key, "step": int(step or 0), "timestamp": int(time.time() * 1000)}
        )
        self._put(op)


@contextlib.contextmanager
def stage_run(stage: str, params, tracking_uri: str | None = None) -> Iterator[Tracker]:
    """Open ``stage``'s child run under the pipeline's parent run; end it with the block.

    ``params`` is the stage's view (its declared params go on the child run) or a whole
    Params (``fashiondiff.config.whole``). The parent run, its key and the ``mlflow.*`` settings
    come from the whole of ``params.yaml``: tracking shapes no DVC output, so no stage declares
    those keys. From a view, the parent logs the file as YAML gives it (``1800``, not ``1800.0``),
    under the same names: validating it whole would import every section's module, and every
    tracked stage would list them all and go stale on any section's edit.
    ``tracking_uri`` overrides ``mlflow.tracking_uri``; a relative ``sqlite:///`` path is the
    project root's (fashiondiff.project: not inside a DVC temporary copy). On an exception the
    child (and parent) end FAILED (KILLED on Ctrl-C) and the exception propagates.

    Opening the runs needs the store: if it does not answer for ``FASHIONDIFF_TRACKING_START_S``
    seconds (30), a one-line PipelineError, before the stage's work. After that nothing waits on
    it (fashiondiff.outbox); leaving the block waits at most ``FASHIONDIFF_TRACKING_FLUSH_S``.
    """
    if not _STAGE_NAME.match(stage):
        raise PipelineError(f"tracking: stage name {stage!r} has characters other than [A-Za-z0-9_.@:/-]")
    if not tracking_enabled():
        yield Tracker(stage)
        return
    whole, settings = pipeline_params(params)
    uri = resolve_tracking_uri(tracking_uri or settings.tracking_uri)
    tracker = _open(stage, whole, settings.experiment, uri)
    if isinstance(params, ParamsView):
        tracker.log_params(params.flat())  # what this stage declares, beside the parent's whole set
    try:
        yield tracker
    except BaseException as exc:
        _close(tracker, _status_for(exc))
        raise
    _close(tracker, "FINISHED")


def resolve_tracking_uri(uri: str, cwd: str | Path | None = None) -> str:
    """Make a relative ``sqlite:///path`` absolute against ``cwd`` (default: the project's root,
    ``DVC_ROOT`` under DVC: a queued experiment's stages run in a temporary copy of the
    repository, whose ``mlflow.db`` DVC deletes with it)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix) :]
        if path and not path.startswith("/") and not path.startswith(":memory:"):
            return prefix + str((Path(cwd or project_root()) / path).resolve())
    return uri


def pipeline_params(params) -> tuple[dict[str, object], MlflowParams]:
    """The parent run's params (the whole file, flat) and the ``mlflow`` section, from a stage's
    view (the file it was read from; validated: ``mlflow`` alone) or from a whole Params."""
    if not isinstance(params, ParamsView):
        return params.flat(), params.mlflow
    raw = params.raw if params.raw is not None else read_params_file()
    return flatten(raw), validated(raw, ["mlflow"]).mlflow


def pipeline_identity(params, cwd: str | Path | None = None) -> dict[str, str]:
    """What makes two stage processes part of the same pipeline run, and its hash ``key``.

    ``dvc exp run`` exports DVC_EXP_NAME and DVC_EXP_BASELINE_REV to its stages
    (dvc/repo/experiments/queue/base.py); ``dvc repro`` exports only DVC_ROOT and
    DVC_STAGE; a stage run by hand has neither. ``params``: a whole Params, a stage's view, or
    the flat params themselves.
    """
    root = os.environ.get("DVC_ROOT") or str(cwd or os.getcwd())
    baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
    exp_name = os.environ.get("DVC_EXP_NAME") or ("repro" if "DVC_STAGE" in os.environ else "local")
    identity = {
        "commit": baseline or _git_commit(root),
        "baseline_rev": baseline,
        "exp_name": exp_name,
    }
    flat = params if isinstance(params, dict) else pipeline_params(params)[0]
    blob = json.dumps({"params": {k: _text(v) for k, v in flat.items()}, **identity}, sort_keys=True)
    identity["key"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return identity


# -- internals ---------------------------------------------------------------------------

START_S = ("FASHIONDIFF_TRACKING_START_S", 30.0)  # opening the runs: give up after this


def _open(stage: str, params: dict[str, object], experiment: str, uri: str) -> Tracker:
    """Create the stage's runs (retried while the store does not answer, up to START_S), then
    hand further calls to an outbox. Errors: one line."""
    quiet_mlflow()
    fast_failing_requests(uri)
    from mlflow.tracking import MlflowClient

    identity = pipeline_identity(params)
    client = MlflowClient(tracking_uri=uri)
    deadline, waiting = time.monotonic() + seconds(START_S), False
    while True:
        try:
            with store_lock(uri):
                tracker = _open_runs(client, stage, params, experiment, identity, uri)
            break
        except PipelineError:  # already one line (a deleted experiment)
            raise
        except Exception as exc:  # noqa: BLE001 - the store's errors: retried or one line
            if not is_transient(exc) or time.monotonic() >= deadline:
                hint = (
                    f" (tried for {seconds(START_S):g} s: is the server running? FASHIONDIFF_TRACKING=off "
                    f"runs without tracking)"
                    if is_transient(exc)
                    else ""
                )
                raise PipelineError(f"mlflow ({display_uri(uri)}): {first_line(exc, repr(exc))}{hint}") from exc
            if not waiting:
                print(
                    f"mlflow: {display_uri(uri)} does not answer; retrying for up to {seconds(START_S):g} s",
                    file=sys.stderr,
                    flush=True,
                )
                waiting = True
            time.sleep(min(seconds(RETRY_S), max(0.0, deadline - time.monotonic())))
    tracker.outbox = Outbox(client, uri, project_root(), label=display_uri(uri))
    kept = tracker.outbox.adopted
    adopted = f"; delivering {kept} tracking calls an earlier stage kept" if kept else ""
    print(
        f"mlflow: {stage} run {tracker.run_id} in pipeline run {tracker.parent_run_id} "
        f"({display_uri(uri)}, experiment {experiment}){adopted}",
        file=sys.stderr,
    )
    return tracker


def _open_runs(
    client, stage: str, params: dict[str, object], experiment: str, identity: dict[str, str], uri: str
) -> Tracker:
    """The experiment, the pipeline's parent run and this stage's child run (idempotent: a
    retry finds the parent made before, and supersedes a child made before)."""
    exp_id = _experiment(client, experiment, uri)
    parent_id = _parent(client, exp_id, identity)
    _log_params(client, parent_id, params)  # idempotent: same key, same values
    child = client.create_run(
        exp_id,
        run_name=stage,
        tags={
            TAG_PARENT: parent_id,
            TAG_ROLE: "stage",
            TAG_STAGE: stage,
            TAG_KEY: identity["key"],
            TAG_COMMIT: identity["commit"],
            TAG_EXP_NAME: identity["exp_name"],
            "mlflow.user": _user(),
        },
    )
    _supersede(client, exp_id, parent_id, stage, keep=child.info.run_id)
    client.update_run(parent_id, status="RUNNING")
    return Tracker(stage, client, child.info.run_id, parent_id, uri)


def _close(tracker: Tracker, status: str) -> None:
    """End child then parent, through the outbox: waits at most FLUSH_S for the store, then
    keeps what is left on disk for the next stage to deliver. Never masks an exception."""
    now = int(time.time() * 1000)
    for run_id in (tracker.run_id, tracker.parent_run_id):
        tracker.outbox.put({"op": "end", "run": run_id, "status": status, "end_time": now})
    try:
        spool = tracker.outbox.close()
    except Exception as exc:  # noqa: BLE001 - a tracking hiccup must not hide the stage's error
        if status == "FINISHED":
            raise
        print(f"mlflow: could not mark run {tracker.run_id} {status}: {exc!r}", file=sys.stderr)
        return
    if spool is not None:
        print(
            f"mlflow: {display_uri(tracker.tracking_uri)} did not answer for {seconds(FLUSH_S):g} s; its "
            f"undelivered calls are kept in {spool} for the next stage to deliver",
            file=sys.stderr,
        )


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
            return client.create_experiment(
                name, artifact_location=_artifact_location(uri), tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
            )
        except MlflowException:  # created meanwhile by another stage process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise PipelineError(
            f"mlflow: experiment {name!r} is deleted; restore it (mlflow experiments restore) or purge it (mlflow gc)"
        )
    if TAG_EXPERIMENT_KIND not in exp.tags:  # a kind chosen in the UI is left alone
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return exp.experiment_id


def _artifact_location(uri: str) -> str | None:
    """sqlite without a server: ``mlartifacts/`` beside the database; servers: their default."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
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
    tags = {
        TAG_KEY: identity["key"],
        TAG_ROLE: "pipeline",
        TAG_COMMIT: identity["commit"],
        TAG_EXP_NAME: identity["exp_name"],
        "mlflow.user": _user(),
    }
    if identity["baseline_rev"]:
        tags[TAG_BASELINE] = identity["baseline_rev"]
    mine = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    # Race: every process applies the same rule (earliest wins) to what it sees after creating.
    winner = (_parents(client, exp_id, identity["key"]) or [mine])[0]
    if winner != mine:
        client.delete_run(mine)
    return winner


def _parents(client, exp_id: str, key: str) -> list[str]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_KEY}` = '{key}' and tags.`{TAG_ROLE}` = 'pipeline'")
    return [r.info.run_id for r in sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))]


def _supersede(client, exp_id: str, parent_id: str, stage: str, keep: str) -> None:
    runs = client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}' and tags.`{TAG_STAGE}` = '{stage}'"
    )
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


def _text(value: object) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_VALUE else text[: _MAX_PARAM_VALUE - 3] + "..."


def _git_commit(root: str) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=False
        )
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
