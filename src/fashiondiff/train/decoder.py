"""The decoder's objective: 2.1's U-Net denoising MoVQ latents.

The U-Net sees noised latents, the MultilingualCLIP hidden states as
``encoder_hidden_states`` and ``added_cond_kwargs={"text_embeds": pooled,
"image_embeds": clip_image_embeds}``, and is trained on the epsilon loss of its first
four output channels. The other four are 2.1's learned-variance channels: the
DDIM sampler of kandinsky-2-1 discards them (``noise_pred.split(...)``), so they
are left out of the loss and keep their base weights' behaviour.

Condition dropout follows 2.1's training: the caption becomes the empty caption
with probability ``text_dropout``, the image embedding becomes the blank-image
embedding (the pipeline's negative image embedding) with probability
``image_dropout``.
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


class DecoderTask:
    name = "decoder"

    def __init__(
        self,
        unet,
        scheduler,
        cache: Cache,
        text_dropout: float,
        image_dropout: float,
        objective: Objective | None = None,
    ):
        self.model = unet
        self.objective = objective  # the loss options (fashiondiff.train.objective); None: plain MSE
        self.scheduler = scheduler
        self.cache = cache
        self.text_dropout, self.image_dropout = text_dropout, image_dropout
        self.uncond = {
            k: torch.from_numpy(cache.uncond[k]).float() for k in ("mclip_hidden", "mclip_embeds", "image_embeds")
        }

    def __len__(self) -> int:
        return len(self.cache)

    def batch(self, index: np.ndarray, device) -> dict[str, torch.Tensor]:
        fields = self.cache.fetch(index, ("latents", "mclip_hidden", "mclip_embeds", "image_embeds"))
        return {k: to_tensor(v, device) for k, v in fields.items()}

    def loss(self, model, batch, draws: SampleDraws) -> torch.Tensor:
        latents = batch["latents"]
        device = latents.device
        noise = draws.randn(latents.shape[1:])
        t = draws.randint(self.scheduler.config.num_train_timesteps)
        no_text = draws.rand() < self.text_dropout
        no_image = draws.rand() < self.image_dropout
        target, noised_with = (noise, noise) if self.objective is None else self.objective.noises(noise, draws)
        noisy = self.scheduler.add_noise(latents, noised_with, t)
        u = {k: v.to(device) for k, v in self.uncond.items()}
        hidden = drop(batch["mclip_hidden"], u["mclip_hidden"], no_text)
        pooled = drop(batch["mclip_embeds"], u["mclip_embeds"], no_text)
        image = drop(batch["image_embeds"], u["image_embeds"], no_image)
        out = model(
            noisy, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "image_embeds": image}
        ).sample
        pred = out[:, : latents.shape[1]].float()
        if self.objective is None:
            return F.mse_loss(pred, target)
        return self.objective.loss(pred, target, t)
