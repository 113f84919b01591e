"""The web page's backend, without the web: the base and the tuned model side by side.

Usage::

    studio = Studio([Side("base", "models/base/prior", "models/base/decoder", takes_adapters=True),
                     Side("tuned", "models/prior", "models/decoder")],
                    adapters=find_adapters(["models"], "models/base/prior", "models/base/decoder"),
                    limits=Limits(), sampling=Sampling(steps=50, height=64, width=64))
    result = studio.generate("black leather mini skirt", photo=None, seed=0, steps=50,
                             guidance=4.0, strength=0.3, adapter="none")
    result.images   # {"base": PIL image or None, "tuned": ...}; result.notes: what failed

A side whose folder is missing (no ``make repro`` yet) does not stop the page: its image is
None and a note says why, and the folder is looked for again on the next request. Bad input
(empty prompt, unreadable or oversized photo, out-of-range setting) raises PipelineError
before any model runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from fashiondiff.errors import PipelineError
from fashiondiff.models.select import resolve_adapters, resolve_models
from fashiondiff.sampling import Sampling
from fashiondiff.serving.engine import Engine, Limits, Request, check_request
from fashiondiff.serving.images import open_photo

NO_ADAPTER = "none"


class Side:
    """One model (prior + decoder), loaded on first use and kept. LoRA adapters are trained
    against the base, so only a side with ``takes_adapters`` gets one applied. ``folder``:
    the folder holding prior/ and decoder/ when the side was named by one (``--model``)."""

    def __init__(
        self,
        label: str,
        prior: str,
        decoder: str,
        device: str | None = None,
        takes_adapters: bool = False,
        folder: str | None = None,
    ) -> None:
        self.label, self.prior, self.decoder, self.device = label, prior, decoder, device
        self.takes_adapters, self.folder = takes_adapters, folder
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        if self._engine is None:  # a failure is not kept: the next request tries again
            if self.folder is not None:  # "models: no such model folder", not a Hub-id hint
                resolve_models(self.folder, None, None)
            self._engine = Engine(self.prior, self.decoder, self.device)
        return self._engine

    def describe(self) -> str:
        return f"{self.label}: {self.prior} + {self.decoder}"


@dataclass
class Result:
    images: dict  # side label -> PIL image, or None where that side failed
    labels: dict  # side label -> caption (the base side names its LoRA adapter)
    notes: list[str]  # one line per failed side


class Studio:
    def __init__(self, sides: list[Side], adapters: dict[str, tuple], limits: Limits, sampling: Sampling):
        self.sides, self.adapters, self.limits, self.sampling = sides, adapters, limits, sampling

    def generate(
        self, prompt: str, photo: str | None, seed, steps, guidance, strength, adapter: str = NO_ADAPTER
    ) -> Result:
        """One image per side for ``prompt`` (an edit of the ``photo`` file when given)."""
        request = self.request(prompt, photo, seed, steps, guidance, strength)
        if adapter != NO_ADAPTER and adapter not in self.adapters:
            raise PipelineError(f"no LoRA adapter {adapter!r} (known: {', '.join(self.adapters) or 'none'})")
        images, labels, notes = {}, {}, []
        for side in self.sides:
            chosen = adapter if side.takes_adapters else NO_ADAPTER
            labels[side.label] = side.label + ("" if chosen == NO_ADAPTER else f" + LoRA {chosen}")
            try:
                engine = side.engine()
                engine.use_adapters(*self.adapters.get(chosen, (None, None)))
                images[side.label] = engine(request)[0]
            except PipelineError as exc:
                images[side.label] = None
                notes.append(f"{side.label} model: {exc}")
        if not any(image is not None for image in images.values()):
            raise PipelineError("; ".join(notes))
        return Result(images, labels, notes)

    def request(self, prompt, photo, seed, steps, guidance, strength) -> Request:
        """The page's fields as a checked Request (PipelineError naming the bad field)."""
        numbers = {"seed": seed, "steps": steps, "guidance": guidance, "strength": strength}
        for name, value in numbers.items():
            if value is None:
                raise PipelineError(f"{name}: give a number")
        source = open_photo(Path(photo), self.limits) if photo else None
        sampling = replace(self.sampling, steps=int(steps), guidance_scale=float(guidance), strength=float(strength))
        request = Request(prompt or "", source, int(seed), 1, sampling)
        check_request(request, self.limits)
        return request

    def describe(self) -> str:
        return "; ".join(side.describe() for side in self.sides)


def find_adapters(folders: list[str], base_prior: str, base_decoder: str, required: bool = True) -> dict[str, tuple]:
    """``{folder: (prior_lora, decoder_lora)}`` for each folder holding prior/lora and/or
    decoder/lora (as training writes them). A folder without any is an error when
    ``required``, else skipped (the tuned model trained without LoRA)."""
    found = {}
    for folder in folders:
        try:
            found[str(folder)] = resolve_adapters(str(folder), None, None, base_prior, base_decoder)
        except PipelineError:
            if required:
                raise
    return found
