"""Evaluate: base vs tuned Kandinsky 2.1 on held-out captions.

Usage::

    report = evaluate("data/extracted/validation", "models/base/prior", "models/base/decoder",
                      "models/prior", "models/decoder", params, "reports", tracker)

For ``evaluate.num_prompts`` held-out captions (seeded choice, one row per product
first) both models generate one image each, prompt ``i`` with seed ``params.seed + i``.
Metrics, in the base prior's own CLIP space (what the model conditions on):

* ``clip_score``: generated image vs its caption (also ``real``: the real image vs it);
* ``fd_clip``: Fréchet distance between generated images and ALL held-out real images;
* ``fid``: the standard Inception FID (``fashiondiff.evaluate.fid``) of the generated
  images vs ALL held-out real images, only when ``evaluate.fid_weights`` names the
  Inception weights file (``fid_status`` says what was computed, or why not), with
  ``fid_n_generated`` and ``fid_n_real`` beside it: FID is biased at small N.

Real images are resized to ``model.resolution`` (bicubic) before any encoder sees them,
so real and generated images enter CLIP / Inception at the same resolution.
Outputs: ``reports_dir/metrics.json`` and ``reports_dir/samples/``: ``grid.png``,
``image_text.png``, every generated image as ``base/0000.png``, ``tuned/0000.png``, ...
(prompt ``i`` is file ``i``; lossless, so any FID tool can recompute the numbers) and
``real_images.txt`` (the held-out real images, relative to the captions folder).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from fashiondiff.config import EDIT_STRENGTH
from fashiondiff.data.split import select_split
from fashiondiff.errors import PipelineError
from fashiondiff.evaluate import figures
from fashiondiff.evaluate.metrics import ClipEncoder, GaussianStats, clip_score, frechet_distance, inception_fid
from fashiondiff.generate import Sampling, as_img2img, image_text_to_image, sampling_from_params, text_to_image
from fashiondiff.io import atomic_dir, write_json

EDIT_PROMPT = "black leather mini skirt"  # the method figure's prompt (image + text -> image)
REQUIRED_COLUMNS = ("row", "product_id", "caption", "image")


def heldout_rows(captions_dir: str | Path, params) -> pd.DataFrame:
    """Held-out rows with a caption, in ``row`` order (data.holdout_fraction > 0: by product)."""
    path = Path(captions_dir) / "captions.parquet"
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such captions table (run extract first)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]}")
    rows = select_split(table, "validation", params.data.holdout_fraction, params.seed)
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


def real_statistics(captions_dir: Path, rows: pd.DataFrame, clip: ClipEncoder, fid, resolution: int,
                    batch_size: int) -> GaussianStats:
    """CLIP-embedding statistics of every held-out real image (streamed); feeds FID's real side."""
    stats = GaussianStats()
    paths = rows["image"].tolist()
    for start in tqdm(range(0, len(paths), batch_size), desc="evaluate real", unit="batch"):
        batch = [load_real(captions_dir, p, resolution) for p in paths[start:start + batch_size]]
        stats.update(clip.encode_images(batch))
        if fid is not None:
            fid.update(to_uint8(batch).to(fid.device), real=True)
    return stats


def generate_images(prior, decoder, captions: list[str], seed: int, sampling: Sampling,
                    batch_size: int, name: str) -> list[Image.Image]:
    """One image per caption, caption ``i`` seeded ``seed + i``; batched, with progress."""
    images: list[Image.Image] = []
    with tqdm(total=len(captions), desc=f"evaluate {name}", unit="image") as bar:
        for start in range(0, len(captions), batch_size):
            batch = captions[start:start + batch_size]
            seeds = [seed + start + k for k in range(len(batch))]
            images += text_to_image(prior, decoder, batch, seeds, sampling)
            bar.update(len(batch))
    return images


def score(images, text_embeds, real: GaussianStats, clip: ClipEncoder, fid) -> dict[str, float]:
    """clip_score and fd_clip (and fid with its image counts, when available) of one model's images."""
    embeds = clip.encode_images(images)
    scores = {"clip_score": clip_score(embeds, text_embeds),
              "fd_clip": frechet_distance(*GaussianStats.of(embeds).moments(), *real.moments())}
    if fid is not None:
        fid.reset()  # fake side only: reset_real_features=False keeps the real statistics
        fid.update(to_uint8(images).to(fid.device), real=False)
        scores["fid"] = float(fid.compute())
        scores["fid_n_generated"] = int(fid.fake_features_num_samples)
        scores["fid_n_real"] = int(fid.real_features_num_samples)
    return scores


def sample_model(prior, decoder, captions: list[str], source: Image.Image, seed: int,
                 sampling: Sampling, batch_size: int, name: str):
    """One model's images for ``captions`` and its image + text edit of ``source``."""
    images = generate_images(prior, decoder, captions, seed, sampling, batch_size, name)
    (edit,) = image_text_to_image(prior, as_img2img(decoder), [EDIT_PROMPT], [source], [seed], sampling)
    return images, edit


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def evaluate(captions_dir, base_prior: str, base_decoder: str, tuned_prior: str, tuned_decoder: str,
             params, reports_dir, tracker) -> dict:
    """Generate with base and tuned models, score both, write metrics.json and figures."""
    import torch

    from fashiondiff.models.loader import load_decoder, load_prior

    captions_dir, reports_dir = Path(captions_dir), Path(reports_dir)
    ev, res = params.evaluate, params.model.resolution
    rows = heldout_rows(captions_dir, params)
    prompts = choose_prompts(rows, ev.num_prompts, params.seed)
    captions = prompts["caption"].astype(str).tolist()
    sampling = sampling_from_params(params, strength=EDIT_STRENGTH)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # The base prior's CLIP towers are the metric space for both models and the real images.
    base_prior_pipe = load_prior(base_prior, "model.prior").to(device)
    clip = ClipEncoder(base_prior_pipe, params.clip_image_size, ev.batch_size)
    fid, fid_status = inception_fid(ev.fid_weights, device)
    if fid is not None:
        fid_status += (f"; generated: samples/base, samples/tuned ({len(captions)} each) vs real: the "
                       f"{len(rows)} held-out images (samples/real_images.txt), at model.resolution "
                       f"{res}x{res} like the generated ones (bicubic-resized where they differ)")
    real_images = [load_real(captions_dir, p, res) for p in prompts["image"]]
    text_embeds = clip.encode_texts(captions)
    real_stats = real_statistics(captions_dir, rows, clip, fid, res, ev.batch_size)

    samples, edits, scores = {}, {}, {}
    for name, prior_name, decoder_name in (("base", None, base_decoder), ("tuned", tuned_prior, tuned_decoder)):
        prior = _tuned_prior(prior_name, base_prior_pipe, device) if prior_name else base_prior_pipe
        decoder = load_decoder(decoder_name, "model.decoder" if name == "base" else "tuned decoder").to(device)
        samples[name], edits[name] = sample_model(prior, decoder, captions, real_images[0], params.seed,
                                                  sampling, ev.batch_size, name)
        scores[name] = score(samples[name], text_embeds, real_stats, clip, fid)
        del prior, decoder  # one model on the device at a time (besides the base prior)
        _free(device)

    report = build_report(scores, clip_score(clip.encode_images(real_images), text_embeds), len(captions),
                          len(rows), clip.count_truncated(captions), fid_status)
    grid = figures.sample_grid(captions, {"real": real_images, **samples})
    edit = figures.image_text_figure(EDIT_PROMPT, real_images[0], edits,
                                     subtitle=f"img2img, strength {EDIT_STRENGTH}, seed {params.seed}")
    write_outputs(reports_dir, report, {"grid.png": grid, "image_text.png": edit}, tracker,
                  samples=samples, real_images=rows["image"].tolist())
    return report


def _tuned_prior(name: str, base_pipe, device: str):
    """The tuned prior pipeline. train_prior copies the base's CLIP towers byte for byte, so when
    the files match, only the tuned prior loads and the base towers are shared (at full size:
    one 1.0 B prior in memory at a time instead of two, and one pair of towers); otherwise the
    whole folder loads. Called after the base model's pass, whose prior it releases."""
    import hashlib

    from fashiondiff.models.loader import load_component, load_prior, resolve

    tuned, base = Path(resolve(name, "tuned prior")), Path(base_pipe.config["_name_or_path"] or "")

    def digest(folder: Path) -> list:
        files = [f for c in ("image_encoder", "text_encoder", "tokenizer", "image_processor")
                 for f in sorted((folder / c).glob("*")) if f.is_file()]
        if not files:
            return []
        sizes = [(f.relative_to(folder).as_posix(), f.stat().st_size) for f in files]
        return sizes + [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]

    if not base.is_dir() or not digest(tuned) or digest(tuned) != digest(base):
        return load_prior(name, "tuned prior").to(device)
    parts = dict(base_pipe.components, prior=load_component(name, "prior", "tuned prior"))
    base_pipe.register_modules(prior=None)  # the base pass is done; its towers stay the metric space
    pipe = type(base_pipe)(**parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sig(x: float) -> float:
    """Six significant digits: stable diffs in ``dvc metrics diff``, no float noise."""
    return float(f"{x:.6g}")


COUNT_KEYS = ("fid_n_generated", "fid_n_real")  # image counts: reported as is, no delta


def build_report(scores: dict, real_clip: float, num_prompts: int, num_real: int, truncated: int,
                 fid_status: str) -> dict:
    """metrics.json: nested dicts of numbers for ``dvc metrics show/diff``, plus fid_status."""
    base, tuned = scores["base"], scores["tuned"]

    def block(side: dict) -> dict:
        return {k: int(v) if k in COUNT_KEYS else _sig(v) for k, v in side.items()}

    return {
        "base": block(base),
        "tuned": block(tuned),
        "delta": {k: _sig(tuned[k] - base[k]) for k in base if k not in COUNT_KEYS},
        "real": {"clip_score": _sig(real_clip)},
        "num_prompts": num_prompts,
        "num_real_images": num_real,
        "truncated_captions": truncated,
        "fid_status": fid_status,
    }


def flatten(report: dict) -> dict[str, float]:
    """The numeric leaves as ``{"base.clip_score": ...}``, for the tracker."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, (int, float)):
            flat[key] = value
    return flat


def write_outputs(reports_dir: Path, report: dict, pictures: dict, tracker, samples: dict | None = None,
                  real_images: list[str] | None = None) -> None:
    """samples/ (atomic folder) and metrics.json (atomic file); figures and metrics to the tracker.

    ``samples``: ``{model name: [PIL images]}``, written as ``samples/<name>/0000.png``, ...
    (PNG, no metadata: the same pixels give the same bytes on every run).
    """
    with atomic_dir(reports_dir / "samples") as folder:
        for file_name, picture in pictures.items():
            picture.save(folder / file_name, format="PNG")
        for name, images in (samples or {}).items():
            (folder / name).mkdir()
            width = max(4, len(str(len(images) - 1)))
            for i, image in enumerate(images):
                image.convert("RGB").save(folder / name / f"{i:0{width}d}.png", format="PNG")
        if real_images is not None:
            (folder / "real_images.txt").write_text("".join(f"{p}\n" for p in real_images))
    write_json(reports_dir / "metrics.json", report)
    tracker.log_summary(flatten(report))
    for file_name, picture in pictures.items():
        tracker.log_image(picture, f"samples/{file_name}")
    tracker.log_artifact(str(reports_dir / "metrics.json"))
