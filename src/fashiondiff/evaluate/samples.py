"""evaluate's sampling: the batches of prompts, who runs them, the partial folder and the resume.

Usage (``fashiondiff.evaluate.run`` does this)::

    tasks = plan(job)                                    # base's batches, its edits, tuned's, its edits
    partial = Partial.open(reports / ".samples.partial", fingerprints, held, batch_size)   # process 0
    tallies = sample(job, tasks, done, ranks, partial, sampler)   # this process's scores

The work is a fixed list of tasks: for each model (base, then tuned), each domain's batches of
prompts (batch ``b`` is prompts ``b * evaluate.batch_size`` on; prompt ``i`` seeded ``seed +
i``), then each domain's image + text edits, one variant (a strength, or the mix) at a time, in
batches of the same size (``fashiondiff.evaluate.edits``). Who runs a task changes nothing in
its images: each batch is sampled alone, from its own seeded generators. One process runs them all in order;
``evaluate.workers`` 2 on a CPU (one process started by ``python``): one spawned process per
model, as before; under ``accelerate launch``: each process a contiguous share, round by round,
handing its PNGs to process 0.

Whoever writes (process 0, or a model's worker) puts each PNG into ``<reports>/.samples.partial/``
as it comes and, after each round, records the finished batches in ``.progress/<model>.json``
beside a fingerprint of what makes the samples (model folders, sampling params, prompts, device
type). A stopped or killed run resumes: finished batches are read back from their PNGs
(lossless: the same pixels, the same scores) instead of being generated again.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.clip import ClipEncoder
from fashiondiff.evaluate.edits import MIX, edit_prompts, pair_scores, variant_name, variants
from fashiondiff.evaluate.fid import fid_state, inception_fid
from fashiondiff.evaluate.heldout import HeldOut, to_uint8
from fashiondiff.evaluate.tally import Tally
from fashiondiff.io import write_json
from fashiondiff.sampling import (
    Sampling,
    as_img2img,
    decode,
    generators,
    image_text_to_image,
    mixed_embeds,
    text_to_image,
)
from fashiondiff.spread import Ranks, batch_runs, batches_in, disk_full_is_an_error

MODELS = ("base", "tuned")
TEXT = "text"  # a task's variant: text -> image of the domain's prompts (else an edit variant)
EDITS = "edits"  # the edits' folder in samples/: edits/<domain>/<variant>/<model>/0000.png
PROGRESS = ".progress"  # inside the partial folder: the progress files; not published


@dataclass(frozen=True)
class ModelPair:
    """A prior and a decoder to evaluate (folders or cached Hub ids) and the keys that named them."""

    prior: str
    decoder: str
    prior_key: str = "model.prior"
    decoder_key: str = "model.decoder"


@dataclass(frozen=True)
class Task:
    model: str
    domain: str
    batch: int
    variant: str = TEXT  # or an edit variant: "s30" (img2img at strength 0.3), "mix"

    @property
    def key(self) -> str:
        """The task's set of batches in a progress file: ``catalogue``, ``catalogue/s30``..."""
        return self.domain if self.variant == TEXT else f"{self.domain}/{self.variant}"


@dataclass
class Job:
    """What every process needs to run tasks (pickled to a worker)."""

    pairs: dict[str, ModelPair]
    held: dict[str, HeldOut]
    sampling: Sampling
    seed: int
    batch_size: int
    resolution: int
    clip_image_size: int
    fid_weights: str
    device: str
    work: Path  # the partial samples folder
    edit_items: int = 1  # photos edited per domain (the first prompts' own photos)
    strengths: tuple[float, ...] = (0.5,)  # img2img strengths
    mix_image_weight: float = 0.5  # the photo's weight in the mix

    def count(self, domain: str, variant: str) -> int:
        """Prompts (text) or edited photos of a domain."""
        prompts = len(self.held[domain].prompts)
        return prompts if variant == TEXT else min(self.edit_items, prompts)

    def span(self, task: Task) -> range:
        """The prompt (or edited photo) numbers of ``task``."""
        total = self.count(task.domain, task.variant)
        return range(task.batch * self.batch_size, min((task.batch + 1) * self.batch_size, total))

    def folder(self, domain: str, variant: str, model: str) -> Path:
        if variant == TEXT:
            return self.work / domain / model
        return self.work / EDITS / domain / variant / model

    def paths(self, task: Task) -> list[Path]:
        width = max(4, len(str(self.count(task.domain, task.variant) - 1)))
        folder = self.folder(task.domain, task.variant, task.model)
        return [folder / f"{i:0{width}d}.png" for i in self.span(task)]

    def variants(self) -> list[str]:
        return variants(self.strengths)

    def edit_prompts(self, domain: str) -> list[str]:
        """Each edited photo's prompt: its caption, recoloured (``fashiondiff.evaluate.edits``)."""
        return edit_prompts(self.held[domain].captions[: self.count(domain, MIX)])

    def sources(self, domain: str, numbers) -> list[Image.Image]:
        """The edited photos ``numbers``: those prompts' own photos, at the model's resolution."""
        return self.held[domain].real_images(numbers, self.resolution)

    def strength(self, variant: str) -> float:
        return next(s for s in self.strengths if variant_name(s) == variant)


def plan(job: Job) -> list[Task]:
    """Per model: each domain's text batches, then each domain's edit batches, variant by variant."""
    tasks = []
    for model in MODELS:
        for variant in [TEXT, *job.variants()]:
            for domain in job.held:
                batches = -(-job.count(domain, variant) // job.batch_size)
                tasks += [Task(model, domain, b, variant) for b in range(batches)]
    return tasks


def _folder_id(name: str):
    """A model folder's files, sizes and times (a retrained model is another model); a Hub id as is."""
    path = Path(name)
    if not path.is_dir():
        return name
    return [
        name,
        sorted(
            (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()
        ),
    ]


def fingerprint(job: Job, model: str) -> str:
    """What a model's finished batches must share with this run to be kept."""
    pair = job.pairs[model]
    blob = {
        "model": [_folder_id(pair.prior), _folder_id(pair.decoder)],
        "sampling": asdict(job.sampling),
        "seed": job.seed,
        "batch_size": job.batch_size,
        "device": job.device.split(":")[0],
        "prompts": {d: h.captions for d, h in job.held.items()},
        "edits": {
            "items": job.edit_items,
            "strengths": list(job.strengths),
            "mix": job.mix_image_weight,
            "sources": {d: h.prompts["image"].astype(str).tolist() for d, h in job.held.items()},
        },
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass
class Partial:
    """The partial samples folder: PNGs as they come, and which tasks are finished."""

    job: Job
    fingerprints: dict[str, str]
    done: set[Task] = field(default_factory=set)

    @classmethod
    def open(cls, job: Job, fingerprints: dict[str, str]) -> Partial:
        """Keep each model's finished batches whose fingerprint matches; clear the others'."""
        partial = cls(job, fingerprints)
        for model, wanted in fingerprints.items():
            progress = job.work / PROGRESS / f"{model}.json"
            saved = json.loads(progress.read_text()) if progress.is_file() else {}
            if saved.get("fingerprint") == wanted:
                for key, runs in saved.get("done", {}).items():
                    domain, _, variant = key.partition("/")
                    partial.done |= {Task(model, domain, b, variant or TEXT) for b in batches_in(runs)}
            else:
                for domain in job.held:
                    shutil.rmtree(job.work / domain / model, ignore_errors=True)
                    for folder in (job.work / EDITS / domain).glob(f"*/{model}"):
                        shutil.rmtree(folder, ignore_errors=True)
                progress.unlink(missing_ok=True)
        return partial

    def reread(self) -> Partial:
        """As the progress files say now (workers write their own)."""
        return Partial.open(self.job, self.fingerprints)

    def summary(self) -> str:
        return ", ".join(f"{sum(t.model == m for t in self.done)} of {m}'s batches" for m in self.fingerprints)

    def kept(self) -> str:
        return f"the finished batches ({self.summary()}) are kept in {self.job.work}, rerun to resume"

    def take(self, results: list[tuple[Task, list[bytes] | None]]) -> None:
        """Write a round's new PNGs, then record the round's tasks as finished."""
        for task, pngs in results:
            if pngs is None or task in self.done:
                continue  # read back from this folder: already there
            for path, data in zip(self.job.paths(task), pngs):
                with disk_full_is_an_error(path, self.kept):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
        self.done |= {task for task, _ in results}
        for model in sorted({task.model for task, _ in results}):
            self._save(model)

    def _save(self, model: str) -> None:
        done = {}
        for task in self.done:
            if task.model == model:
                done.setdefault(task.key, set()).add(task.batch)
        path = self.job.work / PROGRESS / f"{model}.json"
        write_json(
            path, {"fingerprint": self.fingerprints[model], "done": {d: batch_runs(b) for d, b in sorted(done.items())}}
        )


def _png(image: Image.Image) -> bytes:
    """Lossless, no metadata: the same pixels give the same bytes on every run."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def base_clip(job: Job) -> ClipEncoder:
    """The base prior's CLIP towers: the metric space for both models and the real images."""
    from fashiondiff.models.loader import load_prior

    base = job.pairs["base"]
    return ClipEncoder(
        load_prior(base.prior, base.prior_key, prior=None).to(job.device), job.clip_image_size, job.batch_size
    )


class Sampler:
    """Runs tasks in this process: a model is loaded when a task first needs it (one at a time),
    and every batch is scored as it comes (then only its PNG bytes are kept, until handed over)."""

    def __init__(self, job: Job, clip: ClipEncoder, fids: dict):
        self.job, self.clip, self.fids = job, clip, fids  # fids: per domain, or None without weights
        self.tallies: dict[tuple[str, str], Tally] = {}
        self.model: tuple[str, object, object] | None = None
        self.group: tuple[str, str] | None = None

    def run(self, task: Task, done: bool) -> tuple[Task, list[bytes] | None]:
        """The task's images (read back if ``done`` and there, else sampled) scored; its new PNGs."""
        images = self._read(task) if done else None
        pngs = None
        if images is None:
            images = self._sample(task)
            pngs = [_png(image) for image in images]
        if task.variant == TEXT:
            self._score(task, images)
        else:
            self._score_edits(task, images)
        return task, pngs

    def _read(self, task: Task) -> list[Image.Image] | None:
        try:
            out = []
            for path in self.job.paths(task):
                with Image.open(path) as image:
                    out.append(image.convert("RGB"))
            return out
        except OSError:  # not on this machine's disk, or cut short: sampled again (same bytes)
            return None

    def _pipelines(self, model: str):
        from fashiondiff.models.loader import load_decoder, load_prior

        if self.model is None or self.model[0] != model:
            self.model = None
            gc.collect()
            pair = self.job.pairs[model]
            prior = load_prior(pair.prior, pair.prior_key).to(self.job.device)
            decoder = load_decoder(pair.decoder, pair.decoder_key).to(self.job.device)
            for pipe in (prior, decoder):
                pipe.set_progress_bar_config(disable=True)
            self.model = (model, prior, decoder, as_img2img(decoder))
        return self.model[1:]

    def _sample(self, task: Task) -> list[Image.Image]:
        prior, decoder, img2img = self._pipelines(task.model)
        job = self.job
        numbers = job.span(task)
        seeds = [job.seed + i for i in numbers]
        if task.variant == TEXT:
            captions = job.held[task.domain].captions[numbers.start : numbers.stop]
            return text_to_image(prior, decoder, captions, seeds, job.sampling)
        prompts = job.edit_prompts(task.domain)[numbers.start : numbers.stop]
        sources = job.sources(task.domain, numbers)
        if task.variant != MIX:
            strength = job.strength(task.variant)
            return image_text_to_image(
                prior, img2img, prompts, sources, seeds, replace(job.sampling, strength=strength)
            )
        # 2.1's mix, as `fashiondiff generate --mix`: the photo and the prompt through prior.interpolate,
        # each item with its own generator (prior, then decoder)
        gens = generators(seeds)
        weight = job.mix_image_weight
        embeds = [
            mixed_embeds(prior, [source, prompt], [weight, 1.0 - weight], gen, job.sampling)
            for source, prompt, gen in zip(sources, prompts, gens)
        ]
        import torch

        batched = tuple(torch.cat([e[k] for e in embeds]) for k in (0, 1))
        return decode(decoder, prompts, batched, gens, job.sampling)

    def _score_edits(self, task: Task, images: list[Image.Image]) -> None:
        """Each edit's fidelity to its photo and alignment to its prompt (``fashiondiff.evaluate.edits``)."""
        numbers = self.job.span(task)
        edited = self.clip.encode_images(images)
        sources = self.clip.encode_images(self.job.sources(task.domain, numbers))
        prompts = self.clip.encode_texts(self.job.edit_prompts(task.domain)[numbers.start : numbers.stop])
        tally = self.tallies.setdefault((task.model, task.key), Tally())
        tally.add_pairs(numbers, clip=pair_scores(edited, prompts), fidelity=pair_scores(edited, sources))

    def _score(self, task: Task, images: list[Image.Image]) -> None:
        key = (task.model, task.domain)
        if key != self.group:  # a process's tasks of one model and domain are consecutive
            self.finish()
            self.group = key
            if self.fids.get(task.domain) is not None:
                self.fids[task.domain].reset()  # the fake side only: reset_real_features=False
        tally = self.tallies.setdefault(key, Tally())
        embeds = self.clip.encode_images(images)
        tally.add_prompts(embeds, self.job.span(task), self.job.held[task.domain])
        tally.stats.update(embeds)
        fid = self.fids.get(task.domain)
        if fid is not None:
            fid.update(to_uint8(images).to(fid.device), real=False)

    def finish(self) -> None:
        """Hand the current model and domain's FID sums to its tally."""
        fid = self.group and self.fids.get(self.group[1])
        if fid is not None:
            self.tallies[self.group].fid_parts = [fid_state(fid, real=False)]
        self.group = None


def run_share(
    sampler: Sampler, tasks: list[Task], done: set[Task], ranks: Ranks, partial: Partial | None, desc: str
) -> dict[tuple[str, str], Tally]:
    """This process's share of ``tasks``, round by round; ``partial`` (process 0, or a worker
    writing its own model) writes every process's PNGs. Returns this process's tallies."""
    mine = ranks.shard(tasks)
    rounds = ranks.rounds(len(tasks))
    images = sum(len(sampler.job.span(t)) for t in tasks)
    with tqdm(total=images, desc=desc, unit="image", dynamic_ncols=True, disable=partial is None) as bar:
        for k in range(rounds):
            result = sampler.run(mine[k], mine[k] in done) if k < len(mine) else None
            parts = ranks.gather(result, f"samples (round {k + 1} of {rounds})")
            if partial is not None:
                parts = [p for p in parts if p is not None]
                partial.take(parts)
                bar.update(sum(len(sampler.job.span(task)) for task, _ in parts))
    sampler.finish()
    return sampler.tallies


def _worker(job: Job, tasks: list[Task], partial: Partial, model: str) -> dict:
    """A spawned process sampling one model (``evaluate.workers``): its own CLIP, FID, writes."""
    import torch

    if job.device == "cpu":
        torch.set_num_threads(1)  # the project's CPU rule: one thread per process
    fids = {d: inception_fid(job.fid_weights, job.device)[0] for d in job.held}
    sampler = Sampler(job, base_clip(job), fids)
    return run_share(sampler, tasks, partial.done, Ranks("evaluate", 0.0), partial, f"evaluate {model}")


def sample(
    job: Job, tasks: list[Task], done: set[Task], ranks: Ranks, partial: Partial | None, sampler: Sampler, workers: int
) -> dict[tuple[str, str], Tally]:
    """Every task, by this process alone, by one worker per model (``workers`` >= 2, one process on
    a CPU), or shared with the launcher's other processes."""
    if workers < 2 or ranks.count > 1 or job.device != "cpu":
        return run_share(sampler, tasks, done, ranks, partial, "evaluate")
    pool = ProcessPoolExecutor(min(workers, len(MODELS)), mp_context=mp.get_context("spawn"))
    try:
        jobs = {m: pool.submit(_worker, job, [t for t in tasks if t.model == m], partial, m) for m in MODELS}
        tallies = {}
        for model, future in jobs.items():
            try:
                tallies.update(future.result())
            except BrokenProcessPool:
                raise PipelineError(
                    f"evaluate: the process sampling the {model} model died (killed, or out of "
                    f"memory); {partial.reread().kept()}"
                ) from None
    except BaseException:
        # A stop (SIGTERM, Ctrl-C) or a failure must not wait for a model's whole sampling:
        # Python 3.11's pool has no terminate_workers() (3.14 has), hence its private list.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return tallies
