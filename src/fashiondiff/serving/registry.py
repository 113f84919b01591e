"""The MLflow Model Registry, as the ``register`` stage uses it: find a version, log and register one.

Usage (``fashiondiff.serving.register``)::

    version = find_model_version(tracker, "fashiondiff-kandinsky", TAG_DIGEST, digest)
    version = log_model(tracker, ENTRY, "fashiondiff-kandinsky", tags, artifacts=..., signature=...)

``tracker`` is the stage's :class:`fashiondiff.tracking.Tracker`: the model is logged on its
child run, and each version is tagged with the pipeline's git commit, DVC experiment, key and
parent run. Tracking off: nothing is searched or logged, the version is "".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from fashiondiff.errors import PipelineError, first_line
from fashiondiff.tracking import TAG_COMMIT, TAG_EXP_NAME, TAG_KEY, Tracker, display_uri

TAG_PIPELINE_RUN = "fashiondiff.pipeline_run"  # on model versions: the parent run's id
_VALIDATION_FAILED = "Failed to validate serving input example"  # mlflow/models/model.py's warning


def find_model_version(tracker: Tracker, name: str, tag: str, value: str) -> str:
    """The newest version of registered model ``name`` tagged ``tag`` = ``value``, or ""."""
    if not tracker.enabled:
        return ""
    from mlflow.exceptions import MlflowException

    try:
        versions = tracker.client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise PipelineError(
            f"mlflow ({display_uri(tracker.tracking_uri)}): cannot search model {name!r}: {first_line(exc)}"
        ) from exc
    found = [int(v.version) for v in versions if v.tags.get(tag) == value]
    return str(max(found)) if found else ""


def log_model(tracker: Tracker, code: str | Path, registered_name: str, tags: dict[str, str], **model) -> str:
    """Log a pyfunc model on the stage's run and register it; return its version.

    ``code`` is the file that builds the model (MLflow's models from code: nothing is
    pickled); ``model`` are ``mlflow.pyfunc.log_model``'s keywords (artifacts,
    signature, input_example, code_paths, pip_requirements, model_config). MLflow runs
    the input example through the logged model; if that fails, so does this call.
    """
    if not tracker.enabled:
        return ""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    run_tags = tracker.client.get_run(tracker.run_id).data.tags
    tags = {
        **tags,
        **{k: run_tags[k] for k in (TAG_COMMIT, TAG_EXP_NAME, TAG_KEY) if k in run_tags},
        TAG_PIPELINE_RUN: tracker.parent_run_id,
    }
    mlflow.set_tracking_uri(tracker.tracking_uri)  # Model.log and register_model use the global one
    try:
        with _failed_validation() as failures:
            info = Model.log(None, mlflow.pyfunc, name="model", run_id=tracker.run_id, python_model=str(code), **model)
        if failures:
            raise PipelineError(f"mlflow: the logged model fails its input example: {failures[0]}")
        version = mlflow.register_model(info.model_uri, registered_name, tags=tags)
    except MlflowException as exc:
        raise PipelineError(
            f"mlflow ({display_uri(tracker.tracking_uri)}): cannot log or register model "
            f"{registered_name!r}: {first_line(exc)}"
        ) from exc
    return str(version.version)


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
