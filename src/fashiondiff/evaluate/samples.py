"""evaluate's sampling: the batches of prompts, who runs them, the partial folder and the resume.

Usage (``fashiondiff.evaluate.run`` does this)::

    tasks = plan(held, batch_size)                       # base's batches, its edit, tuned's, its edit
    partial = Partial.open(reports / ".samples.partial", fingerprints, held, batch_size)   # process 0
    tallies = sample(job, tasks, done, ranks, partial, sampler)   # this process's scores

The work is a fixed list of tasks: for each model (base, then tuned), each domain's batches of
prompts (batch ``b`` is prompts ``b * evaluate.batch_size`` on; prompt ``i`` seeded ``seed +
i``), then the model's image + text edit. Who runs a task changes nothing in its images: each
batch is sampled alone, from its own seeded generators. One process runs them all in order;
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.clip import ClipEncoder
from fashiondiff.evaluate.fid import fid_state, inception_fid
from fashiondiff.evaluate.heldout import HeldOut, to_uint8
from fashiondiff.evaluate.tally import Tally
from fashiondiff.io import write_json
from fashiondiff.sampling import Sampling, as_img2img, image_text_to_image, text_to_image
from fashiondiff.spread import Ranks, batch_runs, batches_in, disk_full_is_an_error

EDIT_PROMPT = "black leather mini skirt"  # the method figure's prompt (image + text -> image)
EDIT = "edit"  # a task's domain for the model's image + text edit of the first catalogue prompt's photo
MODELS = ("base", "tuned")
PROGRESS = ".progress"  # inside the partial folder: progress files and the edits; not published


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
    domain: str  # a domain, or EDIT
    batch: int


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

    def span(self, task: Task) -> range:
        """The prompt numbers of ``task``."""
        if task.domain == EDIT:
            return range(1)
        total = len(self.held[task.domain].prompts)
        return range(task.batch * self.batch_size, min((task.batch + 1) * self.batch_size, total))

    def paths(self, task: Task) -> list[Path]:
        if task.domain == EDIT:
            return [self.work / PROGRESS / f"{task.model}.edit.png"]
        width = max(4, len(str(len(self.held[task.domain].prompts) - 1)))
        return [self.work / task.domain / task.model / f"{i:0{width}d}.png" for i in self.span(task)]

    def edit_source(self) -> Image.Image:
        """The first catalogue prompt's own photo: the edit's source."""
        return next(iter(self.held.values())).real_images([0], self.resolution)[0]


def plan(held: dict[str, HeldOut], batch_size: int) -> list[Task]:
    tasks = []
    for model in MODELS:
        for domain, h in held.items():
            tasks += [Task(model, domain, b) for b in range(-(-len(h.prompts) // batch_size))]
        tasks.append(Task(model, EDIT, 0))
    return tasks


def _folder_id(name: str):
    """A model folder's files, sizes and times (a retrained model is another model); a Hub id as is."""
    path = Path(name)
    if not path.is_dir():
        return name
    return [name, sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                         for f in path.rglob("*") if f.is_file())]


def fingerprint(job: Job, model: str) -> str:
    """What a model's finished batches must share with this run to be kept."""
    pair = job.pairs[model]
    blob = {"model": [_folder_id(pair.prior), _folder_id(pair.decoder)], "sampling": asdict(job.sampling),
            "seed": job.seed, "batch_size": job.batch_size, "device": job.device.split(":")[0],
            "prompts": {d: h.captions for d, h in job.held.items()},
            "edit": [EDIT_PROMPT, str(next(iter(job.held.values())).prompts["image"].iloc[0])]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@dataclass
class Partial:
    """The partial samples folder: PNGs as they come, and which tasks are finished."""

    job: Job
    fingerprints: dict[str, str]
    done: set[Task] = field(default_factory=set)

    @classmethod
    def open(cls, job: Job, fingerprints: dict[str, str]) -> "Partial":
        """Keep each model's finished batches whose fingerprint matches; clear the others'."""
        partial = cls(job, fingerprints)
        for model, wanted in fingerprints.items():
            progress = job.work / PROGRESS / f"{model}.json"
            saved = json.loads(progress.read_text()) if progress.is_file() else {}
            if saved.get("fingerprint") == wanted:
                partial.done |= {Task(model, domain, b) for domain, runs in saved.get("done", {}).items()
                                 for b in batches_in(runs)}
            else:
                for domain in job.held:
                    shutil.rmtree(job.work / domain / model, ignore_errors=True)
                progress.unlink(missing_ok=True)
        return partial

    def reread(self) -> "Partial":
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
                done.setdefault(task.domain, set()).add(task.batch)
        path = self.job.work / PROGRESS / f"{model}.json"
        write_json(path, {"fingerprint": self.fingerprints[model],
                          "done": {d: batch_runs(b) for d, b in sorted(done.items())}})


def _png(image: Image.Image) -> bytes:
    """Lossless, no metadata: the same pixels give the same bytes on every run."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def base_clip(job: Job) -> ClipEncoder:
    """The base prior's CLIP towers: the metric space for both models and the real images."""
    from fashiondiff.models.loader import load_prior

    base = job.pairs["base"]
    return ClipEncoder(load_prior(base.prior, base.prior_key, prior=None).to(job.device), job.clip_image_size,
                       job.batch_size)


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
        if task.domain != EDIT:
            self._score(task, images)
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
            self.model = (model, prior, decoder)
        return self.model[1], self.model[2]

    def _sample(self, task: Task) -> list[Image.Image]:
        prior, decoder = self._pipelines(task.model)
        job = self.job
        if task.domain == EDIT:
            return image_text_to_image(prior, as_img2img(decoder), [EDIT_PROMPT], [job.edit_source()], [job.seed],
                                       job.sampling)
        numbers = job.span(task)
        captions = job.held[task.domain].captions[numbers.start:numbers.stop]
        return text_to_image(prior, decoder, captions, [job.seed + i for i in numbers], job.sampling)

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


def run_share(sampler: Sampler, tasks: list[Task], done: set[Task], ranks: Ranks, partial: Partial | None,
              desc: str) -> dict[tuple[str, str], Tally]:
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


def sample(job: Job, tasks: list[Task], done: set[Task], ranks: Ranks, partial: Partial | None,
           sampler: Sampler, workers: int) -> dict[tuple[str, str], Tally]:
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
                raise PipelineError(f"evaluate: the process sampling the {model} model died (killed, or out of "
                                    f"memory); {partial.reread().kept()}") from None
    except BaseException:
        # A stop (SIGTERM, Ctrl-C) or a failure must not wait for a model's whole sampling:
        # Python 3.11's pool has no terminate_workers() (3.14 has), hence its private list.
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return tallies
