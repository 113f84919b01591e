"""The scores of a pipeline's MLflow parent run, from the reports of the stages behind it.

Usage (``stages/register.py``, paths from dvc.yaml, where they are ``register``'s deps)::

    with stage_run("register", params) as tracker:
        log_parent_scores(tracker, StageReports(train_prior=..., train_decoder=...,
                                                metrics=..., evaluation=...))

A parent run holds what each stage that ran under it logged with ``Tracker.log_summary``
(``train_prior.*``, ``train_decoder.*``, ``evaluate.*``: the MLflow UI's columns). A ``dvc
repro`` that finds those stages up to date runs ``register`` alone (``always_changed``), under
a new parent when the commit or params changed: without this, that parent's columns would be
empty. So ``register`` rebuilds each stage's summary from its report files, with the function
that stage logs it with (``fashiondiff.training_summary``, ``fashiondiff.evaluate.summary``), and
logs on the parent the keys it lacks: the same names and values; a parent where the stage ran
is left as it is.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.summary import summary_metrics as evaluate_summary
from fashiondiff.training_summary import summary_metrics as training_summary


@dataclass(frozen=True)
class StageReports:
    """The files the summaries come from: each training's summary, evaluate's two reports."""

    train_prior: Path
    train_decoder: Path
    metrics: Path  # evaluate's metrics.json: every score, base and tuned
    evaluation: Path  # evaluate's evaluation.json: the real images' scores, counts

    def summaries(self) -> dict[str, dict[str, float]]:
        """Stage name -> the summary that stage logs, rebuilt from its reports."""
        return {
            "train_prior": training_summary(_read(self.train_prior)),
            "train_decoder": training_summary(_read(self.train_decoder)),
            "evaluate": evaluate_summary(_read(self.metrics), _read(self.evaluation)),
        }


def log_parent_scores(tracker, reports: StageReports) -> dict[str, list[str]]:
    """Each stage's summary on the parent run, the keys it lacks; stage -> the keys logged."""
    if not tracker.enabled:
        return {}
    logged = {stage: tracker.log_parent_summary(stage, metrics) for stage, metrics in reports.summaries().items()}
    filled = [f"{stage} ({len(keys)})" for stage, keys in logged.items() if keys]
    if filled:
        print(
            f"register: the pipeline run's scores of stages that did not run under it, from their "
            f"reports: {', '.join(filled)}",
            file=sys.stderr,
        )
    return logged


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"register: cannot read {path}: {exc}") from exc
