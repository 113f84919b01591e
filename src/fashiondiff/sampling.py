"""Sampling Kandinsky 2.1: text to image, image + text to image, a weighted mix of conditions.

The library that ``evaluate``, the served model (``fashiondiff.serving``) and ``fashiondiff
generate`` share. Usage::

    prior, decoder = load_prior("models/prior"), load_decoder("models/decoder")
    images = text_to_image(prior, decoder, ["black leather mini skirt"], seeds=[0], sampling=Sampling())
    edits = image_text_to_image(prior, as_img2img(decoder), prompts, sources, seeds, sampling)

Prompt ``i`` draws from a CPU generator seeded ``seeds[i]``: the same noise on every device.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from fashiondiff.errors import PipelineError


@dataclass(frozen=True)
class Sampling:
    """How to sample: prior and decoder steps and guidance, output size, img2img strength."""

    steps: int = 100
    guidance_scale: float = 4.0
    prior_steps: int = 25
    prior_guidance_scale: float = 4.0
    height: int = 512
    width: int = 512
    strength: float = 0.3  # img2img: the page's, generate's and the served model's default


# The checks every entry point's request passes (the web page, the served model, generate):
# one-line errors for what the pipelines would reject with a traceback, or draw from nothing.


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise PipelineError('empty prompt: say what to draw, e.g. "black leather mini skirt"')


def check_strength(sampling: Sampling, img2img: bool = True, flag: str = "") -> None:
    """``strength`` in (0, 1], and for an edit (``img2img``) at least one of the ``steps x
    strength`` denoising steps img2img runs. ``flag``: how the caller names them ("--" for options)."""
    if not 0.0 < sampling.strength <= 1.0:
        raise PipelineError(f"{flag}strength must be in (0, 1], got {sampling.strength}")
    if img2img and int(sampling.steps * sampling.strength) < 1:
        raise PipelineError(
            f"{flag}steps {sampling.steps} x {flag}strength {sampling.strength} leaves no denoising step: raise either"
        )


def generators(seeds: Sequence[int]) -> list:
    """One seeded CPU ``torch.Generator`` per image: the same noise on every device."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def image_embeds(prior, prompts: Sequence[str], gens: list, sampling: Sampling):
    """Prior: captions -> (image_embeds, negative_image_embeds) (2.1's zero-image negative)."""
    out = prior(
        list(prompts),
        generator=gens,
        num_inference_steps=sampling.prior_steps,
        guidance_scale=sampling.prior_guidance_scale,
    )
    return out.image_embeds, out.negative_image_embeds


def mixed_embeds(prior, conditions: Sequence, weights: Sequence[float], gen, sampling: Sampling):
    """2.1's ``prior.interpolate``: the weighted sum of text and image conditions."""
    out = prior.interpolate(
        list(conditions),
        list(weights),
        generator=gen,
        num_inference_steps=sampling.prior_steps,
        guidance_scale=sampling.prior_guidance_scale,
    )
    return out.image_embeds, out.negative_image_embeds


def decode(decoder, prompts: Sequence[str], embeds, gens: list, sampling: Sampling, sources=None):
    """Decoder: (captions, image embeddings[, source images]) -> PIL images.

    With ``sources`` the decoder must be a ``KandinskyImg2ImgPipeline``: each source is
    noised to ``sampling.strength`` and denoised from there.
    """
    positive, negative = embeds
    kwargs = dict(
        image_embeds=positive,
        negative_image_embeds=negative,
        height=sampling.height,
        width=sampling.width,
        num_inference_steps=sampling.steps,
        guidance_scale=sampling.guidance_scale,
        generator=gens,
        output_type="pil",
    )
    if sources is not None:
        kwargs.update(image=list(sources), strength=sampling.strength)
    return decoder(list(prompts), **kwargs).images


def text_to_image(prior, decoder, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling):
    """One image per prompt; prompt ``i`` uses a generator seeded with ``seeds[i]``."""
    gens = generators(seeds)
    return decode(decoder, prompts, image_embeds(prior, prompts, gens, sampling), gens, sampling)


def image_text_to_image(prior, img2img, prompts, sources, seeds, sampling: Sampling):
    """Image + text -> image: prior embeds the prompt, img2img edits the source toward it."""
    gens = generators(seeds)
    embeds = image_embeds(prior, prompts, gens, sampling)
    return decode(img2img, prompts, embeds, gens, sampling, sources=sources)


def as_img2img(decoder):
    """An image + text pipeline sharing the (already loaded) decoder's components, that noises
    the source at the noise level its first denoising step expects (:func:`img2img_class`)."""
    pipe = img2img_class()(**decoder.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@functools.cache
def img2img_class():
    """diffusers' ``KandinskyImg2ImgPipeline`` with the source noised by the decoder's own
    scheduler, to the timestep the denoising starts from.

    The stock pipeline noises with a hard-coded linear 0.0001-0.02 schedule over 1,000 steps (a
    copy of ai-forever/Kandinsky-2's img2img helper) at timestep ``int(1000 * strength) - 2``,
    while 2.1's decoder was trained, and is sampled, on linear 0.00085-0.012 (its scheduler
    config; ``fashiondiff.train.decoder`` trains with the same ``scheduler.add_noise``). The
    source then starts noisier than the step that denoises it assumes: at strength 0.3 and 500
    steps, cumulative alpha 0.40 instead of 0.47; at 0.5, 0.08 instead of 0.16. And a
    strength below 2 / 1000 indexed the schedule at -1 (pure noise). Here the noise level is the
    scheduler's at the first timestep run: strength ``s`` runs the last ``int(steps * s)``
    denoising steps of ``steps``, from the source noised to the first of them; when that is no
    step at all the source comes back through the MoVQ unchanged.
    """
    from diffusers import KandinskyImg2ImgPipeline

    class ScheduledImg2Img(KandinskyImg2ImgPipeline):
        _first_timestep = None

        def get_timesteps(self, num_inference_steps, strength, device):
            timesteps, count = super().get_timesteps(num_inference_steps, strength, device)
            self._first_timestep = timesteps[:1]
            return timesteps, count

        def add_noise(self, original_samples, noise, timesteps):
            if len(self._first_timestep) == 0:
                return original_samples
            start = self._first_timestep.to(original_samples.device).repeat(len(original_samples))
            return self.scheduler.add_noise(original_samples, noise, start)

    return ScheduledImg2Img


def sampling_from_params(params, strength: float = Sampling.strength) -> Sampling:
    """The sampling settings ``evaluate`` uses: diffusion_steps, evaluate.*, model.resolution."""
    ev = params.evaluate
    return Sampling(
        steps=params.diffusion_steps,
        guidance_scale=ev.guidance_scale,
        prior_steps=ev.prior_steps,
        prior_guidance_scale=ev.prior_guidance_scale,
        height=params.model.resolution,
        width=params.model.resolution,
        strength=strength,
    )


def apply_adapters(prior_pipe, decoder_pipe, prior_lora: str | None, decoder_lora: str | None) -> None:
    """Load the adapters onto the pipelines' prior and U-Net (unmerged: scale 1)."""
    if prior_lora is None and decoder_lora is None:
        return
    from fashiondiff.models.adapter import load_adapter

    if prior_lora is not None:
        load_adapter(prior_pipe.prior, prior_lora, "--prior-lora")
    if decoder_lora is not None:
        load_adapter(decoder_pipe.unet, decoder_lora, "--decoder-lora")


def quiet_libraries() -> None:
    """No loading bars or library chatter on the user's terminal; errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
