"""params.yaml's ``embed`` section: the frozen encoders' cache."""

from __future__ import annotations

from typing import Literal

from fashiondiff.config.schema import Count, Section


class EmbedParams(Section):
    batch_size: Count
    dtype: Literal["float32", "float16"]


FIELDS = {"embed": EmbedParams}
