"""params.yaml's ``standin`` section: the embedded default's synthetic data and tiny pre-training."""

from __future__ import annotations

from fashiondiff.config.schema import Count, Float, Fraction, LrSchedule, NonNegative, Positive, Section


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
    lr_schedule: LrSchedule
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


FIELDS = {"standin": StandinParams}
