"""Typed, validated view of ``params.yaml``.

Each stage calls :func:`load_params` once at start-up and passes the section it
needs down as a frozen dataclass. A missing, unknown or mistyped key fails at once
with the key's dotted name, not forty minutes into training.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fashiondiff.errors import PipelineError


@dataclass(frozen=True)
class SyntheticParams:
    train_products: int = 48
    validation_products: int = 24
    poses_per_product: int = 4


@dataclass(frozen=True)
class DataFiles:
    train: str = "data/synthetic/fashiongen_train.h5"
    validation: str = "data/synthetic/fashiongen_validation.h5"


@dataclass(frozen=True)
class DataParams:
    files: DataFiles = field(default_factory=DataFiles)
    caption: str = "{name}"
    chunk_size: int = 256
    workers: int = 2
    holdout_fraction: float = 0.0


@dataclass(frozen=True)
class ModelParams:
    prior: str = "models/base/prior"
    decoder: str = "models/base/decoder"
    resolution: int = 64


@dataclass(frozen=True)
class BaseParams:
    clip_steps: int = 400
    movq_steps: int = 400
    mclip_steps: int = 200
    batch_size: int = 32
    lr: float = 0.001


@dataclass(frozen=True)
class EmbedParams:
    batch_size: int = 32
    dtype: str = "float32"


@dataclass(frozen=True)
class TrainParams:
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 20
    lr_schedule: str = "constant_with_warmup"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    mixed_precision: str = "no"
    ema_decay: float = 0.0
    checkpoint_every: int = 200
    checkpoints_keep: int = 2
    log_every: int = 10
    launcher: str = "python"


@dataclass(frozen=True)
class PriorParams:
    text_dropout: float = 0.1
    trainable: str = "all"


@dataclass(frozen=True)
class DecoderParams:
    text_dropout: float = 0.5
    image_dropout: float = 0.1
    gradient_checkpointing: bool = False
    trainable: str = "all"


@dataclass(frozen=True)
class EvaluateParams:
    num_prompts: int = 24
    guidance_scale: float = 4.0
    prior_guidance_scale: float = 4.0
    prior_steps: int = 25
    batch_size: int = 8
    fid_weights: str = ""


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "fashiongen-kandinsky"


@dataclass(frozen=True)
class Params:
    epochs: int = 200
    batch_size: int = 32
    clip_image_size: int = 224
    diffusion_steps: int = 500
    lr: float = 0.0005
    seed: int = 0
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    base: BaseParams = field(default_factory=BaseParams)
    embed: EmbedParams = field(default_factory=EmbedParams)
    train: TrainParams = field(default_factory=TrainParams)
    prior: PriorParams = field(default_factory=PriorParams)
    decoder: DecoderParams = field(default_factory=DecoderParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.clip_image_size >= 16, "clip_image_size", "must be >= 16")
        _check(self.diffusion_steps >= 1, "diffusion_steps", "must be >= 1")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0.0 <= self.data.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
        _check(self.embed.dtype in ("float32", "float16"), "embed.dtype", "must be float32 or float16")
        _check(self.train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision",
               "must be no, fp16 or bf16")
        _check(self.train.lr_schedule in ("constant_with_warmup", "cosine", "linear"),
               "train.lr_schedule", "must be constant_with_warmup, cosine or linear")
        accum = self.train.gradient_accumulation_steps
        _check(accum >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _check(self.train.checkpoint_every % accum == 0, "train.checkpoint_every",
               "must be a multiple of train.gradient_accumulation_steps (resume lands on a sync step)")
        for key in ("prior.text_dropout", "decoder.text_dropout", "decoder.image_dropout"):
            section, name = key.split(".")
            value = getattr(getattr(self, section), name)
            _check(0.0 <= value <= 1.0, key, "must be in [0, 1]")

    def flat(self) -> dict[str, object]:
        """All params as ``{"data.caption": "{name}", ...}``, for trackers."""
        return _flatten(dataclasses.asdict(self))


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise PipelineError(f"params: {key} {why}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _build(cls, raw: object, where: str):
    """Build dataclass ``cls`` from ``raw``, checking keys and types; errors name the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"params: {where or 'top level'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise PipelineError(f"params: unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        kind = hints[name]
        key = f"{where}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{key}.")
        else:
            values[name] = _coerce(kind, value, key)
    return cls(**values)


def _coerce(kind: type, value: object, key: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise PipelineError(f"params: {key} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PipelineError(f"params: {key} must be an integer, got {value!r}")
    if kind is str and value is None:
        return ""
    if kind is str and value is False:
        # YAML 1.1 reads a bare `no` as false, and `dvc exp run -S` writes params back
        # unquoted: `train.mixed_precision: "no"` comes back as False.
        return "no"
    if not isinstance(value, kind):
        raise PipelineError(f"params: {key} must be a {kind.__name__}, got {value!r}")
    return value


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; missing keys take the defaults above."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such params file") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return _build(Params, raw, "")
