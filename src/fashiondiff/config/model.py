"""params.yaml's ``model`` section: the base Kandinsky 2.1 folders (or Hub ids) and the image side."""

from __future__ import annotations

from typing import Annotated

from fashiondiff.config.schema import Count, Section, Text, checked


class ModelParams(Section):
    prior: Text
    decoder: Text
    resolution: Annotated[Count, checked(lambda v: v % 8 == 0, "must be a multiple of 8 (MoVQ's factor)")]


FIELDS = {"model": ModelParams}
