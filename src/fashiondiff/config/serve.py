"""params.yaml's ``serve`` section: the registered model's name and how much of it MLflow keeps."""

from __future__ import annotations

import re
from typing import Annotated

from fashiondiff.config.schema import Float, Section, Text, checked


class ServeParams(Section):
    registered_model: Annotated[
        Text,
        checked(
            lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None,
            "must be a name of letters, digits, '_', '.', '-'",
        ),
    ]
    max_log_mb: Annotated[Float, checked(lambda v: v >= 0, "must be >= 0 (0: never log the model)")]


FIELDS = {"serve": ServeParams}
