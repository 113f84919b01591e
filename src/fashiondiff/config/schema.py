"""What every params section is built from: strict coercion types, ``Section``, one-line errors.

``params.yaml`` is the one source of values: every field of every section is required, so a
missing key fails at start-up with its dotted name, as does an unknown, mistyped or
out-of-range one. The sections' models live in modules of their own beside this one
(``method``, ``data``, ``model``, ``embed``, ``train``, ``evaluate``, ``serve``, ``compute``,
``tracking``, ``standin``), so that a stage imports, validates and is made stale by only the
sections it declares (``view.stage_params``); ``whole.load_params`` validates the whole file.

Errors are one :class:`PipelineError` line that names the key, e.g.
``params: missing key train.warmup_steps`` or ``params: epochs must be an integer, got 'many'``.
Pydantic does the parsing; the coercions YAML and ``dvc exp run -S`` need are the ``Float``,
``Text`` and ``Switch`` types below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from fashiondiff.errors import PipelineError, first_line

# A float in exponent notation without a dot. YAML 1.1 (PyYAML) reads `1e-05` as a string:
# its float pattern wants a dot (`1.0e-05`), and `dvc exp run -S lr=0.00001` writes `lr: 1e-05`.
_EXPONENT_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _exponent_float(value):
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def yaml_text(value):
    """YAML 1.1 reads an empty value as None and a bare ``no`` as false."""
    if value is None:
        return ""
    if value is False:
        # `dvc exp run -S` writes params back unquoted: `train.mixed_precision: "no"` comes back as False.
        return "no"
    return value


def _switch(value):
    """YAML 1.1 reads a bare on/off as true/false (and `dvc exp run -S` writes them bare)."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def checked(ok, why: str) -> AfterValidator:
    """A pydantic check: ``ok(value)`` or the error "<key> <why>"."""
    def check(value):
        if not ok(value):
            raise ValueError(why)
        return value
    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_exponent_float)]
Text = Annotated[str, BeforeValidator(yaml_text)]
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]
Count = Annotated[int, checked(lambda v: v >= 1, "must be >= 1")]
NonNegative = Annotated[int, checked(lambda v: v >= 0, "must be >= 0")]
Positive = Annotated[Float, checked(lambda v: v > 0, "must be > 0")]
Fraction = Annotated[Float, checked(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")]
LrSchedule = Literal["constant_with_warmup", "cosine", "linear"]  # diffusers' get_scheduler names we allow

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|min|h)")
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600}


def duration_s(value) -> float | None:
    """A checkpoint period's time form ("30m", "1h", "90s") in seconds; None for a step count.
    Here, not in ``train``: the training loop reads it, and the stand-in's pre-training runs that
    loop without the ``train`` section."""
    if isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        return float(match[1]) * _UNIT_S[match[2]]
    return None


class Section(BaseModel):
    """A params.yaml mapping: every key required, none unknown, types strict, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def flat(self, prefix: str = "") -> dict[str, object]:
        """The values as ``{"data.caption": "{name}", ...}``, for trackers."""
        return flatten(self.model_dump(), prefix)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# --- loading, and pydantic's errors as one line ------------------------------------------

class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans, true and false only, as DVC's own YAML reads
    them: YAML 1.1 also turns a bare yes/no/on/off into a boolean, and `dvc exp run -S` writes
    params.yaml back unquoted (`train.mixed_precision: no`), which MLflow would then show as False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def read_params_file(path: str | Path = "params.yaml"):
    """``path`` as YAML gives it (not validated; booleans as YAML 1.2 spells them), or a one-line error."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({first_line(exc)})") from None


def parse(model: type[Section], tree) -> Section:
    """Validate ``tree`` against ``model``; a failure is one PipelineError line naming the key."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        error = _first(exc.errors())
        known = _known(model, error) if error["type"] == "extra_forbidden" else ""
        raise PipelineError(f"params: {_message(error)}{known}") from None


_KINDS = {"int_type": "an integer", "float_type": "a float", "string_type": "a str", "bool_type": None}


def _message(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return f"unknown key {key}"
    if kind == "missing":
        return f"missing key {key}"
    if kind in ("model_type", "dict_type"):
        return f"{key or 'top level'} must be a mapping, got {type(value).__name__}"
    if kind == "bool_type":
        return f"{key} must be true or false, got {value!r}"
    if kind in _KINDS:
        return f"{key} must be {_KINDS[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"{key} must be {error['ctx']['expected'].replace(chr(39), '')}"
    if kind == "value_error":
        return f"{key} {error['ctx']['error']}"
    return f"{key}: {error['msg']}"


def _first(errors: list[dict]) -> dict:
    """Unknown keys first, then missing ones, then values: the order a reader fixes them in."""
    rank = {"extra_forbidden": 0, "missing": 1}
    return min(errors, key=lambda e: rank.get(e["type"], 2))


def _known(model: type[Section], error: dict) -> str:
    """For an unknown key: the keys its section has."""
    node = model
    for part in error["loc"][:-1]:
        node = node.model_fields[str(part)].annotation
    return f" (known: {', '.join(sorted(node.model_fields))})"
