"""The schema of ``params.yaml``: pydantic models, strict, with no defaults.

``params.yaml`` is the one source of values: every field below is required, so a missing
key fails at start-up with its dotted name, as does an unknown, mistyped or out-of-range
one. Every stage validates the whole file, so a bad ``evaluate.num_prompts`` stops
``extract``, not the end of training. Usage::

    params = load_params("params.yaml")       # Params, frozen
    params.train.warmup_steps, params.flat()["data.caption"]

Errors are one :class:`PipelineError` line that names the key, e.g.
``params: missing key train.warmup_steps`` or ``params: epochs must be an integer, got 'many'``.
Pydantic does the parsing; the three coercions YAML and ``dvc exp run -S`` need are the
``Float`` and ``Text`` types below.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from fashiondiff.errors import PipelineError

# A float in exponent notation without a dot. YAML 1.1 (PyYAML) reads `1e-05` as a string:
# its float pattern wants a dot (`1.0e-05`), and `dvc exp run -S lr=0.00001` writes `lr: 1e-05`.
_EXPONENT_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _exponent_float(value):
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _yaml_text(value):
    if value is None:
        return ""
    if value is False:
        # YAML 1.1 reads a bare `no` as false, and `dvc exp run -S` writes params back
        # unquoted: `train.mixed_precision: "no"` comes back as False.
        return "no"
    return value


def _switch(value):
    """YAML 1.1 reads a bare on/off as true/false (and `dvc exp run -S` writes them bare)."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def _check(ok, why: str):
    def check(value):
        if not ok(value):
            raise ValueError(why)
        return value
    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_exponent_float)]
Text = Annotated[str, BeforeValidator(_yaml_text)]
Count = Annotated[int, _check(lambda v: v >= 1, "must be >= 1")]
NonNegative = Annotated[int, _check(lambda v: v >= 0, "must be >= 0")]
Positive = Annotated[Float, _check(lambda v: v > 0, "must be > 0")]
Fraction = Annotated[Float, _check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")]
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|min|h)")
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600}


def duration_s(value) -> float | None:
    """``train.checkpoint_every``'s time form ("30m", "1h", "90s") in seconds; None for a step count."""
    if isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        return float(match[1]) * _UNIT_S[match[2]]
    return None


def _steps_or_duration(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if (seconds := duration_s(value)) is not None and seconds > 0:
        return value.strip()
    raise ValueError(f"must be a step count >= 1 or a duration like 30m, 1h, 90s, got {value!r}")


def _steps_or_auto(value):
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"must be auto or a step count >= 0 (0: the last step only), got {value!r}")


Schedule = Literal["constant_with_warmup", "cosine", "linear"]  # diffusers' get_scheduler names we allow


class Section(BaseModel):
    """A params.yaml mapping: every key required, none unknown, types strict, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SyntheticParams(Section):
    train_products: Count
    validation_products: Count
    poses_per_product: Count
    generic_train_items: Count
    generic_validation_items: Count


class GeneratorParams(Section):
    prior_epochs: Count
    unet_epochs: Count
    batch_size: Count
    lr: Positive
    warmup_steps: NonNegative
    lr_schedule: Schedule
    cond_dropout: Fraction
    checkpoint_every: Count


class PretrainParams(Section):
    clip_steps: int
    movq_steps: int
    mclip_steps: int
    batch_size: Count
    movq_batch_size: Count
    lr: Float
    guide_fraction: Float
    generator: GeneratorParams


class StandinParams(Section):
    synthetic: SyntheticParams
    pretrain: PretrainParams


class DataFiles(Section):
    train: Text
    validation: Text
    # The one optional key: left out, evaluate skips the generic domain (`dvc exp run -S` cannot
    # delete a key: leave it out of params.yaml, or `fashiondiff run` with a preset's null)
    generic: Annotated[str, _check(lambda v: v.strip() != "", "must name a file (leave the key out for none)")] | None = None


class DataParams(Section):
    files: DataFiles
    caption: Text
    chunk_size: Count
    workers: NonNegative
    holdout_fraction: Annotated[Float, _check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")]


class ModelParams(Section):
    prior: Text
    decoder: Text
    resolution: Annotated[Count, _check(lambda v: v % 8 == 0, "must be a multiple of 8 (MoVQ's factor)")]


class EmbedParams(Section):
    batch_size: Count
    dtype: Literal["float32", "float16"]


class TrainParams(Section):
    gradient_accumulation_steps: Count
    max_grad_norm: Float
    warmup_steps: int
    lr_schedule: Schedule
    weight_decay: Float
    adam_beta1: Float
    adam_beta2: Float
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_yaml_text)]
    ema_decay: Float
    checkpoint_every: Annotated[int | str, BeforeValidator(_steps_or_duration)]  # steps, or time: "30m"
    checkpoints_keep: int
    log_every: Count
    compile: Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch)]
    validate_every: Annotated[int | str, BeforeValidator(_steps_or_auto)]  # 0: the last step only
    validation_images: NonNegative  # 0: the validation loss alone
    validation_steps: Count
    validation_guidance: Positive

    @model_validator(mode="after")
    def _resume_on_a_sync_step(self):
        if isinstance(self.checkpoint_every, int) and self.checkpoint_every % self.gradient_accumulation_steps:
            raise PipelineError("params: train.checkpoint_every must be a multiple of "
                                "train.gradient_accumulation_steps (resume lands on a sync step)")
        return self


class ComputeParams(Section):
    launcher: Text
    timeout_s: Positive


class LoraSection(Section):
    """A ``prior``/``decoder`` section's LoRA keys; LoRA and ``trainable`` are one choice."""

    KEY: ClassVar[str] = ""  # the section's name, for messages
    text_dropout: Fraction
    trainable: Text
    lora_rank: Annotated[int, _check(lambda v: v >= 0, "must be >= 0 (0: full fine-tuning)")]
    lora_alpha: Positive
    lora_dropout: Annotated[Float, _check(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")]
    lora_targets: Annotated[Text, _check(lambda v: any(t.strip() for t in v.split(",")),
                                         "must name at least one module (comma-separated names, "
                                         "e.g. to_q,to_k,to_v,to_out.0)")]

    @model_validator(mode="after")
    def _lora_or_subset(self):
        key = self.KEY
        if self.lora_rank and self.trainable.strip() != "all":
            raise PipelineError(
                f"params: {key}.lora_rank > 0 trains a LoRA adapter and nothing else, so {key}.trainable "
                f"must be all (got {self.trainable!r}); or set {key}.lora_rank: 0 to fine-tune selected parameters")
        return self


class PriorParams(LoraSection):
    KEY: ClassVar[str] = "prior"


class DecoderParams(LoraSection):
    KEY: ClassVar[str] = "decoder"
    image_dropout: Fraction
    gradient_checkpointing: bool


class EvaluateParams(Section):
    num_prompts: Annotated[int, _check(lambda v: v >= 2, "must be >= 2 (fd_clip needs a covariance)")]
    r_precision_candidates: Annotated[int, _check(lambda v: v >= 2,
                                                  "must be >= 2 (the caption itself and at least one other)")]
    guidance_scale: Float
    prior_guidance_scale: Float
    prior_steps: Count
    batch_size: Count
    workers: Count
    fid_weights: Text
    edit_items: Count
    edit_strengths: Annotated[list[Annotated[Float, _check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")]],
                              _check(lambda v: 0 < len(v) == len({round(s * 100) for s in v}),
                                     "must list at least one strength, no two equal in two digits")]
    mix_image_weight: Annotated[Float, _check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)")]


class ServeParams(Section):
    registered_model: Annotated[Text, _check(lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v) is not None,
                                             "must be a name of letters, digits, '_', '.', '-'")]
    max_log_mb: Annotated[Float, _check(lambda v: v >= 0, "must be >= 0 (0: never log the model)")]


class MlflowParams(Section):
    tracking_uri: Text
    experiment: Text


class Params(Section):
    lr: Positive
    epochs: Count
    batch_size: Count
    clip_image_size: Annotated[int, _check(lambda v: v >= 16, "must be >= 16")]
    diffusion_steps: Count
    seed: NonNegative
    compute: ComputeParams
    data: DataParams
    model: ModelParams
    embed: EmbedParams
    train: TrainParams
    prior: PriorParams
    decoder: DecoderParams
    evaluate: EvaluateParams
    serve: ServeParams
    mlflow: MlflowParams
    standin: StandinParams

    @model_validator(mode="after")
    def _every_edit_denoises(self):
        weakest = min(self.evaluate.edit_strengths)
        if int(self.diffusion_steps * weakest) < 1:
            raise PipelineError(f"params: diffusion_steps {self.diffusion_steps} x evaluate.edit_strengths' "
                                f"{weakest} leaves evaluate's img2img no denoising step: raise either")
        return self

    def flat(self) -> dict[str, object]:
        """All params as ``{"data.caption": "{name}", ...}``, for trackers."""
        return flatten(self.model_dump())


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


def _known(error: dict) -> str:
    """For an unknown key: the keys its section has."""
    node = Params
    for part in error["loc"][:-1]:
        node = node.model_fields[str(part)].annotation
    return f" (known: {', '.join(sorted(node.model_fields))})"


def params_from_dict(raw) -> Params:
    """Validate a params tree (as ``yaml.safe_load`` gives it)."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        error = _first(exc.errors())
        known = _known(error) if error["type"] == "extra_forbidden" else ""
        raise PipelineError(f"params: {_message(error)}{known}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate the whole ``params.yaml`` (no view: for tools, tests and tracking)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return params_from_dict(raw)
