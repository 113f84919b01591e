"""Validation during training: the weights the run would save, measured on the held-out cache.

Usage (``fashiondiff.train.run``)::

    validator = Validator("prior", task, open_cache("data/cache/validation"), params, tracker)
    result = train(task, ..., validate=validator)     # the loop calls it at its steps, on every process
    summary.update(validator.conclude(result))        # the last validation's numbers
    validator.write(result, "reports/plots/validation_prior.csv", "reports/validation/prior")

At every ``train.validate_every`` steps and at the last step (docs/monitoring.md):

* ``val_loss``: the task's plain MSE (no loss option) over the whole held-out cache; item ``i`` draws its noise,
  timestep and condition dropout from ``SampleDraws(seed, 0, [i], stream=VALIDATION_STREAM)``,
  the same at every validation and whatever the batch, so the curve moves only with the weights;
* pictures of ``train.validation_images`` fixed held-out items, item ``k`` from a CPU
  generator seeded ``seed + k`` (``evaluate``'s rule), drawn as ``fashiondiff.sampling`` draws
  (2.1's pipelines; not imported, so that editing the sampling library retrains nothing:
  tests/test_validate.py checks the pictures are its pictures) with ``train.validation_steps``
  steps: the decoder from the items' true CLIP image embeddings (its own job, no prior in the
  way); the prior turns the items' captions into image embeddings that the *base* decoder draws
  (its own job, the base decoder in the way);
* ``val_clip_score``: ``fashiondiff.evaluate.clip.clip_score`` of those pictures against
  their captions in the base prior's CLIP space, as ``evaluate`` measures it; for the prior
  also ``val_image_embed_cosine``, the mean cosine of its image embeddings to the true ones.

The captions' encodings come from the cache (the base encoders' outputs, the text towers'
``text_embeds`` included), so no text encoder is loaded; what is (the CLIP image tower,
MoVQ, the base decoder for the prior) loads at the first validation that draws, once, in
the training's precision, on the main process. The other processes wait on a heartbeat
(``_lead``/``_follow``): one small broadcast per unit of work, so no collective waits long
enough for a timeout, and a failure on the main process ends every process.
"""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.clip import ClipEncoder, clip_score
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.train.batch import to_tensor
from fashiondiff.train.draws import VALIDATION_STREAM, SampleDraws
from fashiondiff.train.loop import TrainResult

VALIDATION_RANK = 2**31 - 1  # the pictures' items' order: a stream apart from the data order
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # train.mixed_precision
PICTURES_KEY = "validation"  # the MLflow image key: the run's Images chart, one slider over steps
BUSY, DONE, FAILED = 0, 1, 2  # the main process's heartbeat


@torch.no_grad()
def validation_loss(task, model, val_cache, seed: int, batch_size: int) -> Generator[None, None, float]:
    """The task's plain MSE on a held-out cache with fixed noise (comparable across steps, runs
    and loss options: ``train.loss``, ``min_snr_gamma``, ``noise_offset`` and
    ``input_perturbation`` shape the training loss only), one batch per unit of work:
    ``loss = yield from validation_loss(...)``."""
    train_cache, objective = task.cache, task.objective
    task.cache, task.objective = val_cache, None  # the plain MSE, whatever the loss options
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for lo in range(0, len(val_cache), batch_size):
            index = np.arange(lo, min(lo + batch_size, len(val_cache)))
            draws = SampleDraws(seed, 0, index, device, stream=VALIDATION_STREAM)
            loss = task.loss(model, task.batch(index, device), draws)
            total, count = total + loss.item() * len(index), count + len(index)
            yield
    finally:
        task.cache, task.objective = train_cache, objective
        model.train(was_training)
    return total / max(count, 1)


def choose_items(caption: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` cache positions in a seeded order, one per distinct caption first (FashionGen's
    poses of a product share their caption): the same items at every validation."""
    order = np.random.default_rng([seed, VALIDATION_RANK]).permutation(len(caption))
    first = np.zeros(len(order), dtype=bool)
    first[np.unique(np.asarray(caption)[order], return_index=True)[1]] = True
    return np.concatenate([order[first], order[~first]])[:k]


@dataclass
class Pictures:
    step: int
    images: list  # PIL, one per item
    grid: object  # PIL: the items' held-out images above, the drawn ones below


class Validator:
    """The loop's ``validate``: called on every process; the main process validates."""

    def __init__(self, kind: str, task, val_cache, params, tracker) -> None:
        self.kind, self.task, self.cache, self.tracker = kind, task, val_cache, tracker
        self.seed, self.batch_size = params.seed, params.batch_size
        cfg = params.train
        self.dtype = DTYPES[cfg.mixed_precision]
        self.steps, self.guidance = cfg.validation_steps, cfg.validation_guidance  # prior's and decoder's
        self.resolution = params.model.resolution
        self.models = (params.model.prior, params.model.decoder)
        self.clip_image_size = params.clip_image_size
        self.items = choose_items(val_cache.arrays["caption"], cfg.validation_images, params.seed)
        # its cost in forward passes of the trained model (train.validate_every auto): the loss over the
        # held-out cache, then each picture's guided steps (two passes each); a prior's pictures also
        # run the base U-Net, whose step takes ~2 prior steps (reports/gpu_train.json: 0.21 vs 0.11 s)
        pictures = len(self.items) * self.steps * 2 * (3 if kind == "prior" else 1)
        self.forward_passes = len(val_cache) + pictures
        # the curve's columns: the same whether or not pictures are drawn (`dvc plots` reads them)
        self.columns = ("step", "val_loss", "val_clip_score") + (("val_image_embed_cosine",) if kind == "prior" else ())
        self.parts: dict | None = None  # the frozen components, loaded at the first drawing
        self.last: Pictures | None = None

    def __call__(self, step: int, model: torch.nn.Module) -> dict:
        from accelerate import PartialState

        state = PartialState()
        if state.num_processes > 1 and not state.is_main_process:
            _follow(lambda code: _broadcast(code, state.device), f"train {self.kind}", step)
            return {}
        beat = (lambda code: _broadcast(code, state.device)) if state.num_processes > 1 else (lambda code: code)
        return _lead(self._validate(step, model), beat)

    def _validate(self, step: int, model: torch.nn.Module) -> Generator[None, None, dict]:
        """One validation, in units of work between heartbeats; returns the step's record."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        with self._autocast(device):
            record = {
                "val_loss": (yield from validation_loss(self.task, model, self.cache, self.seed, self.batch_size))
            }
            if len(self.items):
                pictures, scores = yield from self._draw(step, model, device)
                record.update(scores)
                self.last = pictures
        seconds = time.perf_counter() - start
        self.tracker.log_metrics({**record, "validation_s": seconds}, step)
        if self.last is not None and self.last.step == step:
            self.tracker.log_image_at(self.last.grid, PICTURES_KEY, step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items())
        tqdm.write(f"validation {self.kind} at step {step}: {shown} ({seconds:.1f} s)")
        return record

    def _autocast(self, device: torch.device):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def _draw(self, step: int, model: torch.nn.Module, device: torch.device):
        """The items' pictures with ``model`` (in eval mode meanwhile) and their scores."""
        if self.parts is None:
            self.parts = self._load(device)
            yield
        was_training = model.training
        model.eval()
        try:
            images, scores = self._sample(model, device)
        finally:
            model.train(was_training)
        yield
        embeds = self.parts["clip"].encode_images(images)
        scores = {"val_clip_score": clip_score(embeds, self._fields(("text_embeds",))["text_embeds"]), **scores}
        grid = picture_grid([self.parts["references"], images])
        return Pictures(step, images, grid), scores

    def _load(self, device: torch.device) -> dict:
        """The frozen components this kind's pictures need, in the training's precision, and the
        items' held-out images as MoVQ decodes their cached latents (what the decoder aims at)."""
        from fashiondiff.models.loader import load_decoder, load_prior

        (prior_name, decoder_name), no_text = self.models, {"text_encoder": None, "tokenizer": None}
        prior = load_prior(prior_name, "model.prior", torch_dtype=self.dtype, prior=None, **no_text)
        frozen = {} if self.kind == "prior" else {"unet": None}  # the prior's pictures: the base U-Net
        decoder = load_decoder(decoder_name, "model.decoder", torch_dtype=self.dtype, **frozen, **no_text)
        for pipe in (prior, decoder):
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    module.to(device).eval().requires_grad_(False)
        latents = torch.from_numpy(self._fields(("latents",))["latents"]).to(device, self.dtype)
        with torch.no_grad():
            pixels = decoder.movq.decode(latents, force_not_quantize=True).sample
        references = decoder.numpy_to_pil((pixels * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy())
        return {
            "prior": prior,
            "decoder": decoder,
            "references": references,
            "clip": ClipEncoder(prior, self.clip_image_size, batch_size=max(1, len(self.items))),
        }

    def _fields(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return self.cache.fetch(self.items, names)

    def _sample(self, model: torch.nn.Module, device: torch.device) -> tuple[list, dict]:
        """``fashiondiff.sampling.text_to_image``'s calls (its prior, then its decoder, one CPU
        generator per item for both), the captions' encodings read from the cache (the prompts
        handed to the pipelines are placeholders, never encoded)."""
        from diffusers import KandinskyPriorPipeline

        k = len(self.items)
        cached = {
            name: to_tensor(v, device)
            for name, v in self._fields(
                ("image_embeds", "text_embeds", "text_hidden", "text_mask", "mclip_embeds", "mclip_hidden")
            ).items()
        }
        empty = {name: to_tensor(v, device) for name, v in self.cache.uncond.items()}
        gens = [torch.Generator("cpu").manual_seed(self.seed + i) for i in range(k)]
        steps = {"num_inference_steps": self.steps, "guidance_scale": self.guidance, "generator": gens}
        if self.kind == "decoder":
            decoder = self._decoder(model, cached, empty)
            negative = empty["image_embeds"].expand(k, -1)  # 2.1's: the blank image's embedding
            return self._pictures(decoder, cached["image_embeds"], negative, steps), {}
        prior = _quiet(KandinskyPriorPipeline(**{**self.parts["prior"].components, "prior": model}))
        _encode_from_cache(
            prior,
            tuple(cached[f"text_{n}"] for n in ("embeds", "hidden", "mask")),
            tuple(empty[f"text_{n}"] for n in ("embeds", "hidden", "mask")),
            k,
        )
        out = prior([""] * k, **steps)
        cosine = _mean_cosine(out.image_embeds, cached["image_embeds"])
        decoder = self._decoder(self.parts["decoder"].unet, cached, empty)  # the base U-Net
        pictures = self._pictures(decoder, out.image_embeds, out.negative_image_embeds, steps)
        return pictures, {"val_image_embed_cosine": cosine}

    def _pictures(self, decoder, embeds: torch.Tensor, negative: torch.Tensor, steps: dict) -> list:
        return decoder(
            [""] * len(self.items),
            image_embeds=embeds,
            negative_image_embeds=negative,
            height=self.resolution,
            width=self.resolution,
            output_type="pil",
            **steps,
        ).images

    def _decoder(self, unet: torch.nn.Module, cached: dict, empty: dict):
        """2.1's decoder pipeline with ``unet``, the items' M-CLIP encodings from the cache."""
        from diffusers import KandinskyPipeline

        pipe = _quiet(KandinskyPipeline(**{**self.parts["decoder"].components, "unet": unet}))
        _encode_from_cache(
            pipe,
            (cached["mclip_embeds"], cached["mclip_hidden"], None),
            (empty["mclip_embeds"], empty["mclip_hidden"], None),
            len(self.items),
        )
        return pipe

    def conclude(self, result: TrainResult) -> dict[str, float]:
        """The last validation's numbers (at the last step), for the run's summary. A rerun of a
        finished run (resumed at its last step) validated nothing: its last pictures are drawn
        again (same weights, same noise: same pictures), before saving merges any LoRA adapter."""
        last = result.validations[-1] if result.validations else {}
        if last.get("step") != result.steps:
            raise PipelineError(f"train {self.kind}: no validation recorded at the last step {result.steps}")
        if len(self.items) and (self.last is None or self.last.step != result.steps):
            device = next(result.model.parameters()).device
            with self._autocast(device):
                self.last, _ = _run(self._draw(result.steps, result.model, device))
        return {k: float(v) for k, v in last.items() if k != "step"}

    def write(self, result: TrainResult, plot_path: str | None, pictures_dir: str | None) -> None:
        """The validation curve (CSV for `dvc plots`) and the last set of pictures."""
        if plot_path:
            write_curve(plot_path, result.validations, self.columns)
            self.tracker.log_artifact(plot_path)
        if pictures_dir:
            write_pictures(
                Path(pictures_dir),
                self.last,
                self.items,
                self.cache.rows,
                {"sampling_steps": self.steps, "guidance_scale": self.guidance, "resolution": self.resolution},
            )
            self.tracker.log_artifact(pictures_dir, PICTURES_KEY)  # validation/<folder name>/


def _run(work: Generator):
    """A generator's return value, its yields ignored."""
    try:
        while True:
            next(work)
    except StopIteration as done:
        return done.value


def _lead(work: Generator[None, None, dict], beat: Callable[[int], int]) -> dict:
    """Run ``work`` on the main process, beating BUSY after each unit, DONE or FAILED at the end."""
    try:
        while True:
            next(work)
            beat(BUSY)
    except StopIteration as done:
        beat(DONE)
        return done.value
    except BaseException:
        beat(FAILED)
        raise


def _follow(beat: Callable[[int], int], name: str, step: int) -> None:
    """Wait for the main process's validation, one heartbeat at a time."""
    while (code := beat(BUSY)) == BUSY:
        pass
    if code == FAILED:
        raise PipelineError(f"{name}: validation at step {step} failed on the main process (its error is above)")


def _broadcast(code: int, device: torch.device) -> int:
    """The main process's ``code`` on every process (the others' argument is overwritten)."""
    import torch.distributed as dist

    flag = torch.tensor([code], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=0)
    return int(flag.item())


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode_from_cache(pipe, positive: tuple, negative: tuple, k: int) -> None:
    """Make ``pipe`` (a 2.1 prior or decoder pipeline without its text encoder) take the cached
    encodings of the items' captions instead of encoding its prompts: what its ``_encode_prompt``
    returns (diffusers 0.42.1, both pipelines: embeds, hidden states, mask; under guidance the
    empty caption's rows first), one prompt per item. tests/test_validate.py checks the pictures
    against the pipelines fed the captions themselves."""

    def encode(prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt=None):
        if len(prompt) != k or num_images_per_prompt != 1 or negative_prompt is not None:
            raise PipelineError("validation: the cached captions serve one image per item, no negative prompt")
        if not do_classifier_free_guidance:
            return positive
        return tuple(
            None if p is None else torch.cat([n.expand_as(p).to(p.dtype), p]) for p, n in zip(positive, negative)
        )

    pipe._encode_prompt = encode


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


GRID_PAD = 4  # pixels between the grid's pictures (tools/validation_figure.py cuts the grids apart)


def picture_grid(rows: list[list], pad: int = GRID_PAD):
    """Rows of equal-size PIL images on a white sheet, ``pad`` pixels apart."""
    from PIL import Image

    w, h = rows[0][0].size
    sheet = Image.new("RGB", (pad + len(rows[0]) * (w + pad), pad + len(rows) * (h + pad)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet


def write_curve(path: str, validations: list[dict], columns: tuple[str, ...]) -> None:
    """``columns`` of every validation, for `dvc plots` (a score not measured is left blank; no
    timings: an output)."""
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in validations:
            writer.writerow({k: record.get(k, "") for k in columns})


def write_pictures(folder: Path, last: Pictures | None, items: np.ndarray, rows: np.ndarray, settings: dict) -> None:
    """``NNNN.png`` per item (PNG without metadata: same pixels, same bytes), ``grid.png`` (held-out
    above, drawn below) and ``items.json`` (which cache positions and captions.parquet rows)."""
    with atomic_dir(folder) as tmp:
        if last is not None:
            for i, image in enumerate(last.images):
                image.convert("RGB").save(Path(tmp) / f"{i:04d}.png", format="PNG")
            last.grid.save(Path(tmp) / "grid.png", format="PNG")
        write_json(
            Path(tmp) / "items.json",
            {
                "step": last.step if last is not None else None,
                "items": [{"position": int(p), "row": int(rows[p])} for p in items],
                **settings,
            },
        )
