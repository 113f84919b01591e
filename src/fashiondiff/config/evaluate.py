"""params.yaml's ``evaluate`` section: what the evaluation generates and scores (docs/evaluation.md),
and its check across sections: every edit strength leaves img2img a denoising step."""

from __future__ import annotations

from typing import Annotated

from fashiondiff.config.schema import Count, Float, Section, Text, checked
from fashiondiff.errors import PipelineError


class EvaluateParams(Section):
    num_prompts: Annotated[int, checked(lambda v: v >= 2, "must be >= 2 (fd_clip needs a covariance)")]
    r_precision_candidates: Annotated[
        int, checked(lambda v: v >= 2, "must be >= 2 (the caption itself and at least one other)")
    ]
    guidance_scale: Float
    prior_guidance_scale: Float
    prior_steps: Count
    batch_size: Count
    workers: Count
    fid_weights: Text
    edit_items: Count
    edit_strengths: Annotated[
        list[Annotated[Float, checked(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")]],
        checked(
            lambda v: 0 < len(v) == len({round(s * 100) for s in v}),
            "must list at least one strength, no two equal in two digits",
        ),
    ]
    mix_image_weight: Annotated[Float, checked(lambda v: 0.0 < v < 1.0, "must be in (0, 1)")]


FIELDS = {"evaluate": EvaluateParams}


def check(params) -> None:
    """img2img runs ``int(diffusion_steps * strength)`` steps: the weakest edit needs one. Run
    where both keys are validated (the whole file, evaluate, register)."""
    steps, section = getattr(params, "diffusion_steps", None), getattr(params, "evaluate", None)
    if steps is None or section is None:
        return
    weakest = min(section.edit_strengths)
    if int(steps * weakest) < 1:
        raise PipelineError(
            f"params: diffusion_steps {steps} x evaluate.edit_strengths' "
            f"{weakest} leaves evaluate's img2img no denoising step: raise either"
        )
