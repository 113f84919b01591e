"""One loaded Kandinsky 2.1 (prior, decoder, and an img2img pipeline sharing the decoder's
parts) and the checks a request passes first: what the web page and the MLflow model run.

Usage::

    engine = Engine("models/prior", "models/decoder")
    request = Request("black leather mini skirt", source=None, seed=0, num_images=1,
                      sampling=Sampling(steps=50, height=64, width=64))
    check_request(request, Limits())        # PipelineError naming what is wrong
    images = engine(request)                # PIL images; image k uses seed + k

Generation is serialised by a lock: diffusers pipelines keep per-call state in their
scheduler, and both servers call from worker threads (gradio's queue, MLflow's
``asyncio.to_thread``), so two requests must never run one pipeline at once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from fashiondiff.errors import PipelineError
from fashiondiff.sampling import (
    Sampling,
    apply_adapters,
    as_img2img,
    check_prompt,
    check_strength,
    image_text_to_image,
    text_to_image,
)

MAX_SEED = 2**63 - 1  # seeds travel as JSON "long" (int64) in the MLflow signature


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that no request (or burst) can exhaust memory or hold
    the server for long. The page's --max-upload-mb overrides ``max_upload_mb``."""

    max_upload_mb: float = 10.0  # encoded photo size
    max_side: int = 4096  # photo pixels per side, checked before decoding (no image bombs)
    max_prompt_chars: int = 1000  # CLIP reads 77 tokens anyway
    max_images: int = 4  # images per request
    max_steps: int = 1000  # decoder steps (2.1's noise schedule has 1000)
    max_guidance: float = 20.0


@dataclass(frozen=True)
class Request:
    """One generation: ``num_images`` images of ``prompt`` (edits of ``source`` when given)."""

    prompt: str
    source: Any  # an RGB PIL image (image + text -> image), or None (text -> image)
    seed: int
    num_images: int
    sampling: Sampling


def check_request(request: Request, limits: Limits) -> None:
    """One-line PipelineError for anything the pipelines would reject or that breaks a limit."""
    s = request.sampling
    check_prompt(request.prompt)
    _within("prompt length", len(request.prompt), 1, limits.max_prompt_chars, " characters")
    _within("seed", request.seed, 0, MAX_SEED)
    _within("num_images", request.num_images, 1, limits.max_images)
    _within("steps", s.steps, 1, limits.max_steps)
    _within("guidance", s.guidance_scale, 1.0, limits.max_guidance)
    if request.source is not None:
        check_strength(s)


def _within(name: str, value, low, high, unit: str = "") -> None:
    if not low <= value <= high:
        raise PipelineError(f"{name} must be between {low} and {high}{unit}, got {value}")


class Engine:
    """A prior + decoder pair loaded once; call it with a checked :class:`Request`."""

    def __init__(self, prior: str, decoder: str, device: str | None = None) -> None:
        import torch

        from fashiondiff.models.loader import load_decoder, load_prior
        from fashiondiff.sampling import quiet_libraries

        quiet_libraries()  # no loading bars in a server's log

        # The same choice as `fashiondiff generate` and evaluate: the GPU when there is one.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prior = load_prior(prior, "prior").to(self.device)
        self.decoder = load_decoder(decoder, "decoder").to(self.device)
        self.img2img = as_img2img(self.decoder)
        self.adapters: tuple[str | None, str | None] = (None, None)
        self._lock = threading.Lock()

    def __call__(self, request: Request) -> list:
        seeds = [request.seed + k for k in range(request.num_images)]
        prompts = [request.prompt] * request.num_images
        with self._lock:
            if request.source is None:
                return text_to_image(self.prior, self.decoder, prompts, seeds, request.sampling)
            sources = [request.source] * request.num_images
            return image_text_to_image(self.prior, self.img2img, prompts, sources, seeds, request.sampling)

    def use_adapters(self, prior_lora: str | None, decoder_lora: str | None) -> None:
        """Apply these LoRA adapters (None: none) in place of the ones applied now."""
        if (prior_lora, decoder_lora) == self.adapters:
            return
        from fashiondiff.models.adapter import has_adapter

        with self._lock:
            for model in (self.prior.prior, self.decoder.unet):
                if has_adapter(model):
                    model.unload_lora()  # back to the plain base weights
            self.adapters = (None, None)
            apply_adapters(self.prior, self.decoder, prior_lora, decoder_lora)
            self.adapters = (prior_lora, decoder_lora)
