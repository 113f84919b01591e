"""The prior's objective, as Kandinsky 2.1 trained it.

The PriorTransformer predicts the clean CLIP image embedding (``prediction_type
="sample"``), normalised with the prior's own ``clip_mean``/``clip_std``, from its
noised version, conditioned on the CLIP text embedding and hidden states (with
mask). Captions are swapped for the empty caption with probability
``text_dropout`` so that classifier-free guidance still works after tuning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fashiondiff.cache.reader import Cache
from fashiondiff.train.batch import drop, to_tensor

if TYPE_CHECKING:  # the stand-in's pre-training runs these tasks plain, without the options' module
    from fashiondiff.train.draws import SampleDraws
    from fashiondiff.train.objective import Objective


class PriorTask:
    name = "prior"

    def __init__(self, prior, scheduler, cache: Cache, text_dropout: float, objective: Objective | None = None):
        self.model = prior
        self.objective = objective  # the loss options (fashiondiff.train.objective); None: plain MSE
        self.scheduler = scheduler
        self.cache = cache
        self.text_dropout = text_dropout
        # clip_mean/clip_std are Parameters of the prior, but statistics, not weights.
        prior.clip_mean.requires_grad_(False)
        prior.clip_std.requires_grad_(False)
        self.uncond = {
            k: torch.from_numpy(cache.uncond[k]).float() for k in ("text_embeds", "text_hidden", "text_mask")
        }

    def __len__(self) -> int:
        return len(self.cache)

    def batch(self, index: np.ndarray, device) -> dict[str, torch.Tensor]:
        fields = self.cache.fetch(index, ("image_embeds", "text_embeds", "text_hidden", "text_mask"))
        return {k: to_tensor(v, device) for k, v in fields.items()}

    def loss(self, model, batch, draws: SampleDraws) -> torch.Tensor:
        prior = getattr(model, "module", model)
        device = batch["image_embeds"].device
        target = (batch["image_embeds"] - prior.clip_mean) / prior.clip_std
        noise = draws.randn(target.shape[1:])
        t = draws.randint(self.scheduler.config.num_train_timesteps)
        dropped = draws.rand() < self.text_dropout
        noised_with = noise if self.objective is None else self.objective.noises(noise, draws)[1]
        noisy = self.scheduler.add_noise(target, noised_with, t)
        u = {k: v.to(device) for k, v in self.uncond.items()}
        text_embeds = drop(batch["text_embeds"], u["text_embeds"], dropped)
        hidden = drop(batch["text_hidden"], u["text_hidden"], dropped)
        mask = drop(batch["text_mask"].float(), u["text_mask"].float(), dropped).bool()
        pred = model(
            noisy, timestep=t, proj_embedding=text_embeds, encoder_hidden_states=hidden, attention_mask=mask
        ).predicted_image_embedding
        if self.objective is None:
            return F.mse_loss(pred.float(), target)
        return self.objective.loss(pred.float(), target, t)
