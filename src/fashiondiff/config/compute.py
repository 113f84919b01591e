"""params.yaml's ``compute`` section: how the heavy stages run (docs/distributed.md)."""

from __future__ import annotations

from fashiondiff.config.schema import Positive, Section, Text


class ComputeParams(Section):
    launcher: Text
    timeout_s: Positive


FIELDS = {"compute": ComputeParams}
