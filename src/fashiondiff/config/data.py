"""params.yaml's ``data`` section: which FashionGen-layout files feed the pipeline, and how
``extract`` reads them."""

from __future__ import annotations

from typing import Annotated

from fashiondiff.config.schema import Count, Float, NonNegative, Section, Text, checked


class DataFiles(Section):
    train: Text
    validation: Text
    # The one optional key: left out, evaluate skips the generic domain (`dvc exp run -S` cannot
    # delete a key: leave it out of params.yaml, or `fashiondiff run` with a preset's null)
    generic: Annotated[str, checked(lambda v: v.strip() != "",
                                    "must name a file (leave the key out for none)")] | None = None


class DataParams(Section):
    files: DataFiles
    caption: Text
    chunk_size: Count
    workers: NonNegative
    holdout_fraction: Annotated[Float, checked(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")]


FIELDS = {"data": DataParams}
