"""The loss options of peer trainers, applied to both trainings (params ``train``; all off by
default, since the method has none of them; docs/training-options.md).

Usage (``fashiondiff.train.run.make_task`` builds it; a task calls it in its loss)::

    objective = Objective.from_params(params.train, scheduler)
    target_noise, input_noise = objective.noises(noise, draws)       # offset, perturbation
    noisy = scheduler.add_noise(x0, input_noise, t)
    loss = objective.loss(pred.float(), target, t)                    # mse/huber, min-SNR weights

* ``min_snr_gamma`` (Hang et al. 2023): each sample's loss weighted by min(SNR, gamma) in the
  form the scheduler's prediction target needs: / SNR for an epsilon target (the decoder),
  as is for a clean-sample target (2.1's prior predicts the clean CLIP image embedding,
  ``prediction_type="sample"``), / (SNR + 1) for v.
* ``noise_offset``: the noise gets ``offset x N(0, 1)`` shared by a sample's spatial positions
  (per sample and channel of a latent; per sample for an embedding), in both the noised input
  and an epsilon target.
* ``input_perturbation``: the noised input uses ``noise + p x N(0, 1)``; the target keeps the
  noise.
* ``loss``: ``mse`` or ``huber`` (``huber_delta``), per element, then per sample.

The extra draws come from each sample's generator (``fashiondiff.train.draws``) after the
task's own draws (noise, timestep, dropout), so with an option on, a sample keeps its timestep
and dropped caption, and a resumed run draws what an unbroken one does. With every option off the loss is the plain
``F.mse_loss`` call the tasks had before: the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fashiondiff.errors import PipelineError

if TYPE_CHECKING:
    from fashiondiff.train.draws import SampleDraws

SNR_FORMS = ("epsilon", "sample", "v_prediction")


@dataclass(frozen=True)
class Objective:
    min_snr_gamma: float
    noise_offset: float
    input_perturbation: float
    loss_kind: str  # mse, huber
    huber_delta: float
    prediction_type: str  # the scheduler's: what the network predicts
    alphas_cumprod: torch.Tensor | None  # the scheduler's, for the SNR

    @classmethod
    def from_params(cls, train, scheduler) -> Objective:
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if train.min_snr_gamma > 0 and prediction not in SNR_FORMS:
            raise PipelineError(
                f"params: train.min_snr_gamma has no form for a {prediction!r} target (known: {', '.join(SNR_FORMS)})"
            )
        return cls(
            train.min_snr_gamma,
            train.noise_offset,
            train.input_perturbation,
            train.loss,
            train.huber_delta,
            prediction,
            scheduler.alphas_cumprod.float(),
        )

    def noises(self, noise: torch.Tensor, draws: SampleDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """(the noise an epsilon target is, the noise the input is noised with)."""
        if self.noise_offset > 0:
            shape = noise.shape[1:2] + (1,) * (noise.dim() - 2) if noise.dim() > 2 else (1,)
            noise = noise + self.noise_offset * draws.randn(shape)
        if self.input_perturbation > 0:
            return noise, noise + self.input_perturbation * draws.randn(noise.shape[1:])
        return noise, noise

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "mse" and self.min_snr_gamma == 0:
            return F.mse_loss(pred, target)
        if self.loss_kind == "huber":
            each = F.huber_loss(pred, target, reduction="none", delta=self.huber_delta)
        else:
            each = F.mse_loss(pred, target, reduction="none")
        per_sample = each.flatten(1).mean(dim=1)
        if self.min_snr_gamma > 0:
            per_sample = per_sample * self.snr_weights(t)
        return per_sample.mean()

    def snr_weights(self, t: torch.Tensor) -> torch.Tensor:
        alpha = self.alphas_cumprod.to(t.device)[t]
        snr = alpha / (1 - alpha)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1)
        return clipped
