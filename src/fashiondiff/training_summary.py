"""What a training stage logs as its summary, from the summary its report holds.

Usage::

    tracker.log_summary(summary_metrics(report))        # train_<kind>: the dict it writes
    summary_metrics(read(reports/train_<kind>.json))  # register: the same, from the file

The report (``fashiondiff.train.run.write_outputs``: final losses, steps, the last validation's
numbers) is logged key for key, each value a float: on the stage's run, and on the pipeline's
parent run as ``train_<kind>.<key>``. The ``register`` stage rebuilds it from the file for a
parent run the training did not run under (a cached ``dvc repro``: ``fashiondiff.parent_scores``).
"""

from __future__ import annotations


def summary_metrics(report: dict) -> dict[str, float]:
    """``report``'s values as floats, under the same keys."""
    return {k: float(v) for k, v in report.items()}
