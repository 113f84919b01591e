"""Typed, validated view of ``params.yaml``, restricted to what a stage declares.

``params.yaml`` is the one source of values: the dataclasses below have no defaults,
so a missing key fails at start-up with its dotted name, as does an unknown, mistyped
or out-of-range one (every stage validates the whole file, so a bad
``evaluate.num_prompts`` stops ``extract``, not the end of training).

A stage does not get the whole file. :func:`stage_params` reads the stage's own
``params:`` list from ``dvc.yaml`` (or ``embedded/dvc.yaml``) and returns a
:class:`ParamsView` that answers only those keys: reading an undeclared key fails at
once, so DVC always knows what a stage reads and reruns it exactly when that changes.
Usage, in ``stages/<name>.py``::

    params = stage_params("train_prior")       # reads params.yaml, checks, restricts
    params.lr, params.train.warmup_steps        # declared: fine
    params.evaluate.num_prompts                 # undeclared: PipelineError naming the key

With ``FASHIONDIFF_AUDIT=<folder>`` set, each stage process writes
``<folder>/<stage>.<pid>.json`` at exit: the params keys it read and the project modules
it imported, which ``tests/test_pipeline_e2e.py`` checks against ``dvc.yaml``.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from fashiondiff.errors import PipelineError

# Where stages are declared, relative to the repository root; the stand-in's stages sit in
# a dvc.yaml of their own so that `dvc repro` runs them only as ancestors of a real stage.
DVC_FILES = ("dvc.yaml", "embedded/dvc.yaml")
AUDIT_ENV = "FASHIONDIFF_AUDIT"


@dataclass(frozen=True)
class SyntheticParams:
    train_products: int
    validation_products: int
    poses_per_product: int
    generic_train_items: int
    generic_validation_items: int


@dataclass(frozen=True)
class GeneratorParams:
    prior_epochs: int
    unet_epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    lr_schedule: str
    cond_dropout: float
    checkpoint_every: int


@dataclass(frozen=True)
class PretrainParams:
    clip_steps: int
    movq_steps: int
    mclip_steps: int
    batch_size: int
    movq_batch_size: int
    lr: float
    guide_fraction: float
    generator: GeneratorParams


@dataclass(frozen=True)
class EmbeddedParams:
    synthetic: SyntheticParams
    pretrain: PretrainParams


@dataclass(frozen=True)
class DataFiles:
    train: str
    validation: str
    generic: str


@dataclass(frozen=True)
class DataParams:
    files: DataFiles
    caption: str
    chunk_size: int
    workers: int
    holdout_fraction: float


@dataclass(frozen=True)
class ModelParams:
    prior: str
    decoder: str
    resolution: int


@dataclass(frozen=True)
class EmbedParams:
    batch_size: int
    dtype: str


@dataclass(frozen=True)
class TrainParams:
    gradient_accumulation_steps: int
    max_grad_norm: float
    warmup_steps: int
    lr_schedule: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    mixed_precision: str
    ema_decay: float
    checkpoint_every: int
    checkpoints_keep: int
    log_every: int
    launcher: str


@dataclass(frozen=True)
class PriorParams:
    text_dropout: float
    trainable: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str


@dataclass(frozen=True)
class DecoderParams:
    text_dropout: float
    image_dropout: float
    gradient_checkpointing: bool
    trainable: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str


@dataclass(frozen=True)
class EvaluateParams:
    num_prompts: int
    r_precision_candidates: int
    guidance_scale: float
    prior_guidance_scale: float
    prior_steps: int
    batch_size: int
    workers: int
    fid_weights: str


@dataclass(frozen=True)
class ServeParams:
    registered_model: str
    max_log_mb: float


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    experiment: str


LR_SCHEDULES = ("constant_with_warmup", "cosine", "linear")  # diffusers' get_scheduler names we allow
EDIT_STRENGTH = 0.6  # evaluate's image + text example: img2img strength (checked below)


@dataclass(frozen=True)
class Params:
    epochs: int
    batch_size: int
    clip_image_size: int
    diffusion_steps: int
    lr: float
    seed: int
    embedded: EmbeddedParams
    data: DataParams
    model: ModelParams
    embed: EmbedParams
    train: TrainParams
    prior: PriorParams
    decoder: DecoderParams
    evaluate: EvaluateParams
    serve: ServeParams
    mlflow: MlflowParams

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "diffusion_steps", "embed.batch_size", "evaluate.batch_size",
                    "evaluate.prior_steps", "data.chunk_size", "model.resolution", "train.log_every",
                    "train.checkpoint_every", "embedded.pretrain.batch_size",
                    "embedded.pretrain.movq_batch_size", "embedded.synthetic.poses_per_product",
                    "embedded.synthetic.train_products", "embedded.synthetic.validation_products",
                    "embedded.synthetic.generic_train_items", "embedded.synthetic.generic_validation_items"):
            _check(_get(self, key) >= 1, key, "must be >= 1")
        for key in ("prior_epochs", "unet_epochs", "batch_size", "checkpoint_every"):
            _check(_get(self, f"embedded.pretrain.generator.{key}") >= 1, f"embedded.pretrain.generator.{key}",
                   "must be >= 1")
        generator = self.embedded.pretrain.generator
        _check(generator.lr > 0, "embedded.pretrain.generator.lr", "must be > 0")
        _check(generator.warmup_steps >= 0, "embedded.pretrain.generator.warmup_steps", "must be >= 0")
        _check(generator.lr_schedule in LR_SCHEDULES, "embedded.pretrain.generator.lr_schedule",
               f"must be {', '.join(LR_SCHEDULES[:-1])} or {LR_SCHEDULES[-1]}")
        _check(0.0 <= generator.cond_dropout <= 1.0, "embedded.pretrain.generator.cond_dropout", "must be in [0, 1]")
        _check(self.clip_image_size >= 16, "clip_image_size", "must be >= 16")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.seed >= 0, "seed", "must be >= 0")
        _check(self.data.workers >= 0, "data.workers", "must be >= 0")
        _check(0.0 <= self.data.holdout_fraction < 1.0, "data.holdout_fraction", "must be in [0, 1)")
        _check(self.model.resolution % 8 == 0, "model.resolution", "must be a multiple of 8 (MoVQ's factor)")
        _check(self.embed.dtype in ("float32", "float16"), "embed.dtype", "must be float32 or float16")
        _check(self.train.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision",
               "must be no, fp16 or bf16")
        _check(self.train.lr_schedule in LR_SCHEDULES, "train.lr_schedule",
               f"must be {', '.join(LR_SCHEDULES[:-1])} or {LR_SCHEDULES[-1]}")
        accum = self.train.gradient_accumulation_steps
        _check(accum >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _check(self.train.checkpoint_every % accum == 0, "train.checkpoint_every",
               "must be a multiple of train.gradient_accumulation_steps (resume lands on a sync step)")
        for key in ("prior.text_dropout", "decoder.text_dropout", "decoder.image_dropout"):
            _check(0.0 <= _get(self, key) <= 1.0, key, "must be in [0, 1]")
        for section in ("prior", "decoder"):
            _check_lora(getattr(self, section), section)
        _check(self.evaluate.num_prompts >= 2, "evaluate.num_prompts", "must be >= 2 (fd_clip needs a covariance)")
        _check(self.evaluate.r_precision_candidates >= 2, "evaluate.r_precision_candidates",
               "must be >= 2 (the caption itself and at least one other)")
        _check(self.evaluate.workers >= 1, "evaluate.workers", "must be >= 1")
        _check(self.serve.max_log_mb >= 0, "serve.max_log_mb", "must be >= 0 (0: never log the model)")
        _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.serve.registered_model) is not None,
               "serve.registered_model", "must be a name of letters, digits, '_', '.', '-'")
        _check(int(self.diffusion_steps * EDIT_STRENGTH) >= 1, "diffusion_steps",
               f"must be >= 2 (evaluate's img2img runs at strength {EDIT_STRENGTH})")

    def flat(self) -> dict[str, object]:
        """All params as ``{"data.caption": "{name}", ...}``, for trackers."""
        return _flatten(dataclasses.asdict(self))


# --- the view a stage gets ------------------------------------------------------------

class ParamsView:
    """Attribute access to the ``allowed`` keys of a Params (sub)tree; anything else fails.

    ``allowed`` holds dotted keys as ``dvc.yaml`` lists them: a section (``train``) opens
    everything under it, a leaf (``data.caption``) only itself. Every key read is recorded
    in ``reads`` (shared with sub-views) for the audit.
    """

    def __init__(self, node, stage: str, allowed: frozenset[str], prefix: str = "",
                 reads: set[str] | None = None):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", set() if reads is None else reads)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        key = f"{self._prefix}{name}"
        value = getattr(self._node, name)  # AttributeError for a key Params does not have
        if _covered(key, self._allowed):
            self.reads.add(key)
            return value
        if dataclasses.is_dataclass(value) and any(a.startswith(f"{key}.") for a in self._allowed):
            return ParamsView(value, self._stage, self._allowed, f"{key}.", self.reads)
        raise PipelineError(f"stage {self._stage} reads params key {key}, which its params: list in "
                            f"dvc.yaml does not declare (declared: {', '.join(sorted(self._allowed))})")

    def __setattr__(self, name, value):
        raise dataclasses.FrozenInstanceError(f"cannot assign to params.{self._prefix}{name}")

    def flat(self) -> dict[str, object]:
        """The declared params only, flat: what a stage may record in its outputs."""
        full = _flatten(dataclasses.asdict(self._node), self._prefix)
        return {k: v for k, v in full.items() if _covered(k, self._allowed)}


def _covered(key: str, allowed: frozenset[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def declared_params(stage: str, root: str | Path = ".") -> list[str]:
    """The params keys ``stage`` lists in DVC_FILES under ``root`` (only params.yaml's)."""
    for name in DVC_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
        if stage in stages:
            keys: list[str] = []
            body = stages[stage].get("do", stages[stage])  # foreach stages declare under `do`
            for entry in body.get("params", []) or []:
                if isinstance(entry, str):
                    keys.append(entry)
                elif isinstance(entry, dict):
                    keys += [k for file, ks in entry.items() if Path(file).name == "params.yaml" for k in ks]
            return keys
    raise PipelineError(f"stage {stage}: not declared in {' or '.join(DVC_FILES)} under {Path(root).resolve()}")


def stage_params(stage: str, params_path: str | Path = "params.yaml", root: str | Path | None = None) -> ParamsView:
    """Load and validate ``params_path``; return the view of the keys ``stage`` declares.

    ``root`` (where dvc.yaml is) defaults to the repository that holds this package's
    stages, so a stage run by hand from another folder still finds its declaration.
    """
    params = load_params(params_path)
    root = Path(root) if root is not None else _repo_root()
    view = ParamsView(params, stage, frozenset(declared_params(stage, root)))
    _audit_at_exit(stage, view)
    return view


def _repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    main = sys.modules.get("__main__")
    script = Path(getattr(main, "__file__", "") or ".").resolve()
    if script.parent.name == "stages" and (script.parents[1] / DVC_FILES[0]).is_file():
        return script.parents[1]
    return Path.cwd()


def _audit_at_exit(stage: str, view: ParamsView) -> None:
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return

    def write() -> None:
        package = Path(__file__).resolve().parent
        modules = sorted(
            str(Path(m.__file__).resolve().relative_to(package.parent))
            for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(package))
        Path(folder).mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "params_read": sorted(view.reads), "modules": modules}
        (Path(folder) / f"{stage}.{os.getpid()}.json").write_text(json.dumps(record, indent=1))

    atexit.register(write)


def seed_everything(seed: int) -> None:
    """Seed every global RNG a stage may touch: Python's, NumPy's and torch's.

    Our own draws use explicit generators; this is for library code that reads the
    global ones, and for the RNG states Accelerate pickles into checkpoints (a DVC
    output: unseeded, they would differ run to run).
    """
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- loading and validation -------------------------------------------------------------

def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise PipelineError(f"params: {key} {why}")


def _check_lora(section, key: str) -> None:
    """A ``prior``/``decoder`` section's LoRA keys; LoRA and ``trainable`` are one choice."""
    _check(section.lora_rank >= 0, f"{key}.lora_rank", "must be >= 0 (0: full fine-tuning)")
    _check(section.lora_alpha > 0, f"{key}.lora_alpha", "must be > 0")
    _check(0.0 <= section.lora_dropout < 1.0, f"{key}.lora_dropout", "must be in [0, 1)")
    _check(any(t.strip() for t in section.lora_targets.split(",")), f"{key}.lora_targets",
           "must name at least one module (comma-separated names, e.g. to_q,to_k,to_v,to_out.0)")
    _check(section.lora_rank == 0 or section.trainable.strip() == "all", f"{key}.lora_rank",
           f"> 0 trains a LoRA adapter and nothing else, so {key}.trainable must be all "
           f"(got {section.trainable!r}); or set {key}.lora_rank: 0 to fine-tune selected parameters")


def _get(params, key: str):
    for part in key.split("."):
        params = getattr(params, part)
    return params


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
    if not isinstance(raw, dict):
        raise PipelineError(f"params: {where.rstrip('.') or 'top level'} must be a mapping, "
                            f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PipelineError(f"params: unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise PipelineError(f"params: missing key {where}{missing[0]}")
    values = {}
    for name in names:
        kind, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], f"{key}.")
        else:
            values[name] = _coerce(kind, raw[name], key)
    return cls(**values)


# A float in exponent notation without a dot. YAML 1.1 (PyYAML) reads `1e-05` as a string:
# its float pattern wants a dot (`1.0e-05`), and `dvc exp run -S lr=0.00001` writes `lr: 1e-05`.
_EXPONENT_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce(kind: type, value: object, key: str):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
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


def params_from_dict(raw: dict) -> Params:
    """Validate a params tree (as ``yaml.safe_load`` gives it)."""
    return _build(Params, raw, "")


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
