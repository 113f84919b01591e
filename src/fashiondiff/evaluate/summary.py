"""What the evaluate stage logs as its summary, from what its reports hold.

Usage::

    tracker.log_summary(summary_metrics(metrics, details))   # evaluate: the dicts it writes
    summary_metrics(read(metrics.json), read(evaluation.json))  # register: the same, from the files

``metrics`` is ``reports/metrics.json`` (``{domain: {"base": {...}, "tuned": {...}}}``),
``details`` is ``reports/evaluation.json``. The tuned model's scores become
``<domain>.<metric>``; the base model's and the rest ``reference.<domain>.base.<metric>``,
``reference.<domain>.real.<metric>``, ... (numbers only: no lists, no texts). On the pipeline's
parent run each key is ``evaluate.<key>``, the MLflow UI's columns. The ``register`` stage
rebuilds it from the files for a parent run evaluate did not run under (a cached ``dvc repro``:
``fashiondiff.parent_scores``), so a function of the two files alone keeps both the same.
"""

from __future__ import annotations

from fashiondiff.config.schema import flatten


def summary_metrics(metrics: dict, details: dict) -> dict[str, float]:
    """The numbers of ``metrics`` (per domain, base and tuned) and ``details``, named as above."""
    tuned = {domain: by_model["tuned"] for domain, by_model in metrics.items()}
    reference = {domain: {"base": by_model["base"], **details.get(domain, {})} for domain, by_model in metrics.items()}
    reference.update({k: v for k, v in details.items() if k not in metrics})
    return {**numbers(tuned), **numbers(reference, "reference.")}


def numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``report``, flat, as ``{"<prefix>catalogue.clip_score": ...}``."""
    return {k: v for k, v in flatten(report, prefix).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
