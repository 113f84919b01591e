"""params.yaml's ``mlflow`` section: where the runs go (fashiondiff.tracking reads it; no stage
declares it, since tracking shapes no DVC output)."""

from __future__ import annotations

from fashiondiff.config.schema import Section, Text


class MlflowParams(Section):
    tracking_uri: Text
    experiment: Text


FIELDS = {"mlflow": MlflowParams}
