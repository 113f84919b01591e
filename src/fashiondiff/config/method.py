"""params.yaml's top-level keys: the method's hyperparameters (``lr``, ``epochs``, ...) and the seed.

They stay top-level so that ``dvc exp run -S lr=0.001`` works; a stage validates only the
ones it declares (``view.stage_params``).
"""

from __future__ import annotations

from typing import Annotated

from fashiondiff.config.schema import Count, NonNegative, Positive, checked

FIELDS = {
    "lr": Positive,
    "epochs": Count,
    "batch_size": Count,
    "clip_image_size": Annotated[int, checked(lambda v: v >= 16, "must be >= 16")],
    "diffusion_steps": Count,
    "seed": NonNegative,
}
