"""Evaluate: base vs tuned Kandinsky 2.1 on held-out captions of two domains.

Usage::

    report = evaluate({"catalogue": "data/extracted/validation", "generic": "data/extracted/generic"},
                      ModelPair("models/base/prior", "models/base/decoder"),
                      ModelPair("models/prior", "models/decoder"), params, "reports", tracker)

The *catalogue* is what the model is fine-tuned for (held-out FashionGen rows); the
*generic* domain is what the base already drew (for the embedded default the stand-in's
everyday objects; for a real run any FashionGen-layout file of non-catalogue pictures): how
much of it the tuned model keeps is the price of fine-tuning. For each domain,
``evaluate.num_prompts`` held-out captions (seeded choice, one row per product first) and both
models generate one image each, prompt ``i`` with seed ``params.seed + i``. Metrics, in the
base prior's own CLIP space (what the model conditions on), per domain and model:

* ``clip_score``: generated image vs its caption (``real``: the real image vs it);
* ``r_precision``: how often the caption is the closest, by CLIP cosine, of
  ``evaluate.r_precision_candidates`` (R) captions: its own and R - 1 other distinct held-out
  captions of the domain, drawn at random per prompt (seeded); chance is 1/R;
* ``fd_clip``: Fréchet distance between the generated images and ALL held-out real images;
* ``fid``: the standard Inception FID (``fashiondiff.evaluate.fid``) against the same real
  images, only when ``evaluate.fid_weights`` names the Inception weights file, with
  ``fid_n_generated`` and ``fid_n_real`` beside it: FID is biased at small N.

Real images are resized to ``model.resolution`` (bicubic) before any encoder sees them,
so real and generated images enter CLIP / Inception at the same resolution.
Outputs: ``reports_dir/metrics.json``, every score: per domain ``base`` (where fine-tuning
started) and ``tuned``; ``reports_dir/scores.json``, the DVC metrics: the tuned model's scores
alone, per domain (what an experiment changes; six columns, so that ``dvc exp show`` has room
for the params); ``reports_dir/evaluation.json``, what they are compared with and were measured
on: per domain the real images' own scores (``real``: the ceiling), counts, R and its chance
level, and the FID status; and
``reports_dir/samples/``:
``grid.png``, ``image_text.png``, every generated image as ``<domain>/<model>/0000.png``, ...
(prompt ``i`` is file ``i``; lossless, so any FID tool can recompute the numbers) and
``<domain>/real_images.txt`` (the held-out real images, relative to that domain's folder).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fashiondiff.config.schema import EDIT_STRENGTH
from fashiondiff.data.split import select_split
from fashiondiff.errors import PipelineError
from fashiondiff.evaluate import figures
from fashiondiff.evaluate.clip import ClipEncoder, clip_score
from fashiondiff.evaluate.fid import inception_fid
from fashiondiff.evaluate.metrics import (
    GaussianStats,
    frechet_distance,
    r_precision,
    r_precision_candidates,
)
from fashiondiff.io import atomic_dir, write_json
from fashiondiff.sampling import (
    Sampling,
    as_img2img,
    image_text_to_image,
    sampling_from_params,
    text_to_image,
)

EDIT_PROMPT = "black leather mini skirt"  # the method figure's prompt (image + text -> image)
REQUIRED_COLUMNS = ("row", "product_id", "caption", "image")
DOMAINS = ("catalogue", "generic")  # the catalogue first: its first prompt's photo is the edit's source
MODELS = ("base", "tuned")


@dataclass(frozen=True)
class ModelPair:
    """A prior and a decoder to evaluate (folders or cached Hub ids) and the keys that named them."""

    prior: str
    decoder: str
    prior_key: str = "model.prior"
    decoder_key: str = "model.decoder"


def heldout_rows(captions_dir: str | Path, holdout_fraction: float, seed: int) -> pd.DataFrame:
    """Held-out rows with a caption, in ``row`` order (``holdout_fraction`` > 0: by product)."""
    path = Path(captions_dir) / "captions.parquet"
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such captions table (run extract first)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]}")
    rows = select_split(table, "validation", holdout_fraction, seed)
    rows = rows[rows["caption"].astype(str).str.strip() != ""]
    if len(rows) < 2:
        raise PipelineError(f"{path}: {len(rows)} held-out rows with a caption; evaluation needs >= 2")
    return rows.sort_values("row", kind="stable").reset_index(drop=True)


def choose_prompts(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows in a seeded order: one row per product first, then second poses, ..."""
    order = np.random.default_rng(seed).permutation(len(rows))
    shuffled = rows.iloc[order]
    first = ~shuffled["product_id"].duplicated()
    return pd.concat([shuffled[first], shuffled[~first]]).head(n).reset_index(drop=True)


def load_real(captions_dir: Path, relative: str, resolution: int) -> Image.Image:
    """A real image at the generation resolution (bicubic), RGB."""
    path = captions_dir / relative
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (FileNotFoundError, OSError) as exc:
        raise PipelineError(f"{path}: cannot read held-out image ({type(exc).__name__})") from None
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def to_uint8(images) -> "object":
    """PIL images -> uint8 (N, 3, H, W) tensor, the input torchmetrics' FID expects."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


@dataclass
class HeldOut:
    """One domain's held-out set, prepared once for both models."""

    name: str
    folder: Path
    rows: pd.DataFrame  # every held-out row (the real side of fd_clip and FID)
    captions: list[str]  # the prompts
    real_images: list[Image.Image]  # each prompt's own photo
    texts: list[str]  # the distinct held-out captions: R-precision's pool
    text_embeds: np.ndarray  # of ``texts``
    own: np.ndarray  # each prompt's row in ``texts``
    candidates: np.ndarray  # (prompts, R) rows of ``texts``, own first
    real_stats: GaussianStats
    fid: object | None  # torchmetrics FID holding this domain's real features, or None


def prepare(name: str, folder: Path, holdout_fraction: float, params, clip: ClipEncoder, fid) -> HeldOut:
    """Choose the domain's prompts and candidates; embed its captions and every real image."""
    ev, res = params.evaluate, params.model.resolution
    rows = heldout_rows(folder, holdout_fraction, params.seed)
    prompts = choose_prompts(rows, ev.num_prompts, params.seed)
    captions = prompts["caption"].astype(str).tolist()
    texts = sorted(set(rows["caption"].astype(str)))
    r = min(ev.r_precision_candidates, len(texts))
    if r < 2:
        raise PipelineError(f"{folder}: 1 distinct held-out caption; R-precision needs >= 2")
    own = np.array([texts.index(c) for c in captions])
    stats = GaussianStats()
    paths = rows["image"].tolist()
    for start in tqdm(range(0, len(paths), ev.batch_size), desc=f"evaluate real {name}", unit="batch"):
        batch = [load_real(folder, p, res) for p in paths[start:start + ev.batch_size]]
        stats.update(clip.encode_images(batch))
        if fid is not None:
            fid.update(to_uint8(batch).to(fid.device), real=True)
    return HeldOut(name, folder, rows, captions, [load_real(folder, p, res) for p in prompts["image"]], texts,
                   clip.encode_texts(texts), own, r_precision_candidates(own, len(texts), r, params.seed),
                   stats, fid)


def score(images, held: HeldOut, clip: ClipEncoder) -> dict[str, float]:
    """clip_score, r_precision and fd_clip (and fid with its image counts) of one model's images."""
    embeds = clip.encode_images(images)
    scores = {"clip_score": clip_score(embeds, held.text_embeds[held.own]),
              "r_precision": r_precision(embeds, held.text_embeds, held.candidates),
              "fd_clip": frechet_distance(*GaussianStats.of(embeds).moments(), *held.real_stats.moments())}
    fid = held.fid
    if fid is not None:
        fid.reset()  # fake side only: reset_real_features=False keeps the real statistics
        fid.update(to_uint8(images).to(fid.device), real=False)
        scores["fid"] = float(fid.compute())
        scores["fid_n_generated"] = int(fid.fake_features_num_samples)
        scores["fid_n_real"] = int(fid.real_features_num_samples)
    return scores


def sample_model(name: str, pair: ModelPair, prompts: dict[str, list[str]], source: Image.Image, seed: int,
                 sampling: Sampling, batch_size: int, device: str) -> tuple[dict[str, list], Image.Image]:
    """One model's images for every domain's prompts (prompt ``i`` seeded ``seed + i``) and its
    image + text edit of ``source``. Loads the model itself: runs here or in a worker process."""
    import torch

    from fashiondiff.models.loader import load_decoder, load_prior

    if device == "cpu":
        torch.set_num_threads(1)  # the project's CPU rule: one thread per process
    prior = load_prior(pair.prior, pair.prior_key).to(device)
    decoder = load_decoder(pair.decoder, pair.decoder_key).to(device)
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    images = {}
    with tqdm(total=sum(map(len, prompts.values())), desc=f"evaluate {name}", unit="image") as bar:
        for domain, captions in prompts.items():
            images[domain] = []
            for start in range(0, len(captions), batch_size):
                batch = captions[start:start + batch_size]
                seeds = [seed + start + k for k in range(len(batch))]
                images[domain] += text_to_image(prior, decoder, batch, seeds, sampling)
                bar.update(len(batch))
    (edit,) = image_text_to_image(prior, as_img2img(decoder), [EDIT_PROMPT], [source], [seed], sampling)
    del prior, decoder
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return images, edit


def sample_models(pairs: dict[str, ModelPair], prompts: dict[str, list[str]], source: Image.Image, params,
                  device: str) -> dict[str, tuple]:
    """Both models' samples: in ``evaluate.workers`` processes (2: base and tuned at once, each
    with one thread, on a CPU), else one model after the other here (one on the device at a time)."""
    ev = params.evaluate
    args = {name: (name, pair, prompts, source, params.seed, sampling_from_params(params, strength=EDIT_STRENGTH),
                   ev.batch_size, device) for name, pair in pairs.items()}
    if ev.workers < 2 or device != "cpu":
        return {name: sample_model(*a) for name, a in args.items()}
    with ProcessPoolExecutor(min(ev.workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
        jobs = {name: pool.submit(sample_model, *a) for name, a in args.items()}
        return {name: job.result() for name, job in jobs.items()}


def evaluate(folders: dict[str, str | Path], base: ModelPair, tuned: ModelPair, params, reports_dir,
             tracker) -> dict:
    """Generate with base and tuned models on each domain, score both, write the reports."""
    import torch

    from fashiondiff.models.loader import load_prior

    reports_dir = Path(reports_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The base prior's CLIP towers are the metric space for both models and the real images.
    clip = ClipEncoder(load_prior(base.prior, base.prior_key, prior=None).to(device), params.clip_image_size,
                       params.evaluate.batch_size)
    held, fid_status = {}, ""
    for domain in DOMAINS:
        fid, fid_status = inception_fid(params.evaluate.fid_weights, device)
        fraction = params.data.holdout_fraction if domain == "catalogue" else 0.0  # generic: all held out
        held[domain] = prepare(domain, Path(folders[domain]), fraction, params, clip, fid)
    prompts = {d: h.captions for d, h in held.items()}
    source = held["catalogue"].real_images[0]
    results = sample_models({"base": base, "tuned": tuned}, prompts, source, params, device)
    samples = {m: results[m][0] for m in MODELS}
    metrics = {d: {m: _rounded(score(samples[m][d], held[d], clip)) for m in MODELS} for d in DOMAINS}
    details = describe(held, clip, params, fid_status)
    grid = figures.beside([figures.titled(d, figures.sample_grid(
        held[d].captions, {"real": held[d].real_images, **{m: samples[m][d] for m in MODELS}})) for d in DOMAINS])
    edit = figures.image_text_figure(EDIT_PROMPT, source, {m: results[m][1] for m in MODELS},
                                     subtitle=f"img2img, strength {EDIT_STRENGTH}, seed {params.seed}")
    write_outputs(reports_dir, metrics, details, {"grid.png": grid, "image_text.png": edit}, tracker, samples, held)
    return metrics


def describe(held: dict[str, HeldOut], clip: ClipEncoder, params, fid_status: str) -> dict:
    """evaluation.json: the real images' own scores, and what the scores were measured on."""
    out = {}
    for d, h in held.items():
        real = clip.encode_images(h.real_images)
        r = h.candidates.shape[1]
        out[d] = {"prompts": len(h.captions), "real_images": len(h.rows),
                  "distinct_captions": len(h.texts),
                  "r_precision_candidates": r, "r_precision_chance": _sig(1 / r),
                  "truncated_captions": clip.count_truncated(h.captions),
                  "real": {"clip_score": _sig(clip_score(real, h.text_embeds[h.own])),
                           "r_precision": _sig(r_precision(real, h.text_embeds, h.candidates))}}
    if params.evaluate.fid_weights and fid_status.startswith("computed"):
        fid_status += (f"; per domain: samples/<domain>/base and samples/<domain>/tuned vs every held-out image "
                       f"of the domain (samples/<domain>/real_images.txt), at model.resolution "
                       f"{params.model.resolution}x{params.model.resolution} like the generated ones")
    out["fid_status"] = fid_status
    return out


def _sig(x: float) -> float:
    """Six significant digits: stable diffs in ``dvc metrics diff``, no float noise."""
    return float(f"{x:.6g}")


COUNT_KEYS = ("fid_n_generated", "fid_n_real")  # image counts: reported as is


def _rounded(scores: dict) -> dict:
    return {k: int(v) if k in COUNT_KEYS else _sig(v) for k, v in scores.items()}


def flatten(report: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves as ``{"catalogue.clip_score": ...}``, for the tracker."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def write_outputs(reports_dir: Path, metrics: dict, details: dict, pictures: dict, tracker,
                  samples: dict | None = None, held: dict[str, HeldOut] | None = None) -> None:
    """samples/ (atomic folder), metrics.json, scores.json and evaluation.json (atomic files); to
    the tracker: the tuned model's scores as ``<domain>.<metric>``, the base model's and the rest
    as ``reference.<domain>.base.<metric>``, ``reference.<domain>.real.<metric>``, ...

    ``metrics``: ``{domain: {"base": {...}, "tuned": {...}}}``. ``samples``: ``{model: {domain:
    [PIL images]}}``, written as ``samples/<domain>/<model>/0000.png``, ... (PNG, no metadata:
    the same pixels give the same bytes on every run).
    """
    with atomic_dir(reports_dir / "samples") as folder:
        for file_name, picture in pictures.items():
            picture.save(folder / file_name, format="PNG")
        for model, by_domain in (samples or {}).items():
            for domain, images in by_domain.items():
                (folder / domain / model).mkdir(parents=True)
                width = max(4, len(str(len(images) - 1)))
                for i, image in enumerate(images):
                    image.convert("RGB").save(folder / domain / model / f"{i:0{width}d}.png", format="PNG")
        for domain, h in (held or {}).items():
            (folder / domain).mkdir(exist_ok=True)
            (folder / domain / "real_images.txt").write_text("".join(f"{p}\n" for p in h.rows["image"]))
    tuned = {d: by_model["tuned"] for d, by_model in metrics.items()}
    write_json(reports_dir / "metrics.json", metrics)
    write_json(reports_dir / "scores.json", tuned)
    write_json(reports_dir / "evaluation.json", details)
    tracker.log_summary(flatten(tuned))
    reference = {d: {"base": by_model["base"], **details.get(d, {})} for d, by_model in metrics.items()}
    reference.update({k: v for k, v in details.items() if k not in metrics})
    tracker.log_summary({f"reference.{k}": v for k, v in flatten(reference).items()})
    for file_name, picture in pictures.items():  # on the pipeline's parent run too: where one looks first
        tracker.log_image(picture, f"samples/{file_name}", parent_name=file_name)
    for file_name in ("metrics.json", "evaluation.json"):
        tracker.log_artifact(str(reports_dir / file_name))
