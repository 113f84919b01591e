"""The whole ``params.yaml``, every section validated: for commands, tools and tests.

No stage imports this file: a stage validates only the sections it declares
(``view.stage_params``), so that editing one section's module reruns only the stages that
read it. Usage::

    params = load_params("params.yaml")       # Params, frozen
    params.train.warmup_steps, params.flat()["data.caption"]
"""

from __future__ import annotations

from pathlib import Path

from fashiondiff.config.schema import read_params_file
from fashiondiff.config.view import SECTIONS, params_model, validated

Params = params_model(tuple(SECTIONS))  # every top-level key, each typed by its section's module


def params_from_dict(raw) -> Params:
    """Validate a whole params tree (as ``yaml.safe_load`` gives it)."""
    return validated(raw, SECTIONS)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole ``params.yaml``."""
    return params_from_dict(read_params_file(path))
