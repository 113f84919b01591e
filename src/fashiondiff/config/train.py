"""params.yaml's training sections: ``train`` (the shared loop), ``prior`` and ``decoder``
(what each training tunes: a LoRA adapter or selected parameters).

Only the training stages (and those after them) import this file: a new training option
reruns ``train_prior``, ``train_decoder`` and what follows, never extraction or embedding
(tests/test_stale_map.py). The stand-in's pre-training runs the same loop with settings of
its own (``standin.generator.loop_settings``), so it does not import this file either.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BeforeValidator, model_validator

from fashiondiff.config.schema import (
    Count,
    Float,
    Fraction,
    LrSchedule,
    NonNegative,
    Positive,
    Section,
    Switch,
    Text,
    checked,
    duration_s,
    yaml_text,
)
from fashiondiff.errors import PipelineError


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


class TrainParams(Section):
    gradient_accumulation_steps: Count
    max_grad_norm: Float
    warmup_steps: int
    lr_schedule: LrSchedule
    weight_decay: Float
    adam_beta1: Float
    adam_beta2: Float
    mixed_precision: Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(yaml_text)]
    ema_decay: Float
    checkpoint_every: Annotated[int | str, BeforeValidator(_steps_or_duration)]  # steps, or time: "30m"
    checkpoints_keep: int
    log_every: Count
    compile: Switch
    validate_every: Annotated[int | str, BeforeValidator(_steps_or_auto)]  # 0: the last step only
    validation_images: NonNegative  # 0: the validation loss alone
    validation_steps: Count
    validation_guidance: Positive
    # peer trainers' loss and optimiser options (fashiondiff.train.objective; docs/training-options.md)
    min_snr_gamma: Annotated[Float, checked(lambda v: v >= 0, "must be >= 0 (0: off)")]
    noise_offset: Annotated[Float, checked(lambda v: v >= 0, "must be >= 0 (0: off)")]
    input_perturbation: Annotated[Float, checked(lambda v: v >= 0, "must be >= 0 (0: off)")]
    loss: Literal["mse", "huber"]
    huber_delta: Positive
    ema_device: Literal["auto", "cpu"]
    ema_every: Count
    optimizer: Literal["adamw", "adamw8bit"]

    @model_validator(mode="after")
    def _resume_on_a_sync_step(self):
        if isinstance(self.checkpoint_every, int) and self.checkpoint_every % self.gradient_accumulation_steps:
            raise PipelineError(
                "params: train.checkpoint_every must be a multiple of "
                "train.gradient_accumulation_steps (resume lands on a sync step)"
            )
        return self


class LoraSection(Section):
    """A ``prior``/``decoder`` section's LoRA keys; LoRA and ``trainable`` are one choice."""

    KEY: ClassVar[str] = ""  # the section's name, for messages
    text_dropout: Fraction
    trainable: Text
    lora_rank: Annotated[int, checked(lambda v: v >= 0, "must be >= 0 (0: full fine-tuning)")]
    lora_alpha: Positive
    lora_dropout: Annotated[Float, checked(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")]
    lora_targets: Annotated[
        Text,
        checked(
            lambda v: any(t.strip() for t in v.split(",")),
            "must name at least one module (comma-separated names, e.g. to_q,to_k,to_v,to_out.0)",
        ),
    ]

    @model_validator(mode="after")
    def _lora_or_subset(self):
        key = self.KEY
        if self.lora_rank and self.trainable.strip() != "all":
            raise PipelineError(
                f"params: {key}.lora_rank > 0 trains a LoRA adapter and nothing else, so {key}.trainable "
                f"must be all (got {self.trainable!r}); or set {key}.lora_rank: 0 to fine-tune selected parameters"
            )
        return self


class PriorParams(LoraSection):
    KEY: ClassVar[str] = "prior"


class DecoderParams(LoraSection):
    KEY: ClassVar[str] = "decoder"
    image_dropout: Fraction
    gradient_checkpointing: bool


FIELDS = {"train": TrainParams, "prior": PriorParams, "decoder": DecoderParams}
