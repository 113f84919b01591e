"""Evaluate: base vs tuned Kandinsky 2.1 on held-out captions of two domains.

Usage::

    report = evaluate({"catalogue": "data/extracted/validation", "generic": "data/extracted/generic"},
                      ModelPair("models/base/prior", "models/base/decoder"),
                      ModelPair("models/prior", "models/decoder"), params, "reports", tracker)

The *catalogue* is what the model is fine-tuned for (held-out FashionGen rows); the
*generic* domain is what the base already drew (for the embedded default the stand-in's
everyday objects; for a real run any FashionGen-layout file of non-catalogue pictures): how
much of it the tuned model keeps is the price of fine-tuning. ``folders`` without "generic"
(params without ``data.files.generic``) measures the catalogue alone: no generic key in the
reports, and the generic edit curves are written with their header only. For each domain,
``evaluate.num_prompts`` held-out captions (seeded choice, one row per product first; drawn
with replacement when the domain has fewer rows: ``fashiondiff.evaluate.heldout``) and both
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

Memory does not grow with ``evaluate.num_prompts``: images stream, batch by batch, into the
statistics (``fashiondiff.evaluate.tally``) and onto disk (``fashiondiff.evaluate.samples``,
which also shares the batches out among ``accelerate launch``'s processes and resumes a stopped
run); the grid shows the first ``GRID_ROWS`` prompts. Under several processes every number but
``fd_clip`` and ``fid`` is the one process's, bit for bit; those two sum the processes'
statistics in another order (float64 round-off, ~1e-14 relative: docs/distributed.md).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from fashiondiff.evaluate import figures
from fashiondiff.evaluate.clip import ClipEncoder
from fashiondiff.evaluate.edits import MIX, pair_scores, variant_name
from fashiondiff.evaluate.fid import fid_from_parts, fid_state, inception_fid
from fashiondiff.evaluate.heldout import HeldOut, held_out, load_real, to_uint8
from fashiondiff.evaluate.metrics import frechet_distance
from fashiondiff.evaluate.samples import (
    MODELS,
    PROGRESS,
    TEXT,
    Job,
    ModelPair,
    Partial,
    Sampler,
    Task,
    base_clip,
    fingerprint,
    plan,
    sample,
)
from fashiondiff.evaluate.summary import summary_metrics
from fashiondiff.evaluate.tally import Tally
from fashiondiff.io import atomic_file, write_json
from fashiondiff.sampling import sampling_from_params
from fashiondiff.spread import HandOverFailed, Interrupted, Ranks, disk_full_is_an_error, with_kept

__all__ = ["DOMAINS", "ModelPair", "evaluate"]

DOMAINS = ("catalogue", "generic")
CURVE_COLUMNS = ("strength", "edit_clip_score", "edit_fidelity")  # edits_<domain>_<model>.csv
GRID_ROWS = 24  # prompts shown in grid.png (24 rows of 192 px cells and captions: ~6,000 px tall)
EDIT_ROWS = 4  # photos per domain shown in image_text.png
TOP_ROWS = 3  # prompts per domain in base_vs_tuned.png


def real_tallies(
    held: dict[str, HeldOut], clip: ClipEncoder, fids: dict, resolution: int, batch_size: int, ranks: Ranks
) -> dict[tuple[str, str], Tally]:
    """This process's share of the real side, per domain: every held-out image (``rows``: the real
    statistics of fd_clip and FID) and each prompt's own photo (``prompts``: the real images'
    clip_score and r_precision), in batches of ``batch_size``, as one process takes them."""
    out = {}
    for domain, h in held.items():
        rows, prompts = Tally(), Tally()
        fid = fids.get(domain)
        paths = h.rows["image"].tolist()
        for b in ranks.shard(range(-(-len(paths) // batch_size))):
            images = [load_real(h.folder, p, resolution) for p in paths[b * batch_size : (b + 1) * batch_size]]
            rows.stats.update(clip.encode_images(images))
            if fid is not None:
                fid.update(to_uint8(images).to(fid.device), real=True)
        if fid is not None:
            rows.fid_parts = [fid_state(fid, real=True)]
        for b in ranks.shard(range(-(-len(h.prompts) // batch_size))):
            numbers = range(b * batch_size, min((b + 1) * batch_size, len(h.prompts)))
            prompts.add_prompts(clip.encode_images(h.real_images(numbers, resolution)), numbers, h)
        out[("rows", domain)], out[("prompts", domain)] = rows, prompts
    return out


def evaluate(
    folders: dict[str, str | Path],
    base: ModelPair,
    tuned: ModelPair,
    params,
    reports_dir,
    tracker,
    ranks: Ranks | None = None,
) -> dict | None:
    """Generate with base and tuned models on each domain, score both, write the reports.

    Under several processes (``ranks``) each takes a share of the work; process 0 writes and
    returns the metrics, the others return None.
    """
    ranks = ranks or Ranks.start("evaluate", 0.0)
    reports_dir = Path(reports_dir)
    ev = params.evaluate
    job = Job(
        {"base": base, "tuned": tuned},
        {},
        sampling_from_params(params),
        params.seed,
        ev.batch_size,
        params.model.resolution,
        params.clip_image_size,
        ev.fid_weights,
        ranks.device,
        reports_dir / ".samples.partial",
        ev.edit_items,
        tuple(ev.edit_strengths),
        ev.mix_image_weight,
    )
    clip = base_clip(job)
    fids, fid_status = {}, ""
    for domain in (d for d in DOMAINS if d in folders):
        fids[domain], fid_status = inception_fid(ev.fid_weights, ranks.device)
        fraction = params.data.holdout_fraction if domain == "catalogue" else 0.0  # generic: all held out
        job.held[domain] = held_out(domain, Path(folders[domain]), fraction, params, clip)
    tasks = plan(job)
    partial = Partial.open(job, {m: fingerprint(job, m) for m in MODELS}) if ranks.main else None
    if partial is not None and partial.done:
        print(f"evaluate: resuming {reports_dir / 'samples'}: {partial.summary()} are read back, not sampled")
    done = ranks.broadcast(partial and partial.done, f"the list of finished batches ({job.work})")
    try:
        tallies = real_tallies(job.held, clip, fids, job.resolution, ev.batch_size, ranks)
        tallies.update(sample(job, tasks, done, ranks, partial, Sampler(job, clip, fids), ev.workers))
        parts = ranks.gather(tallies, "the scores")
        if not ranks.main:
            return None
        whole = {key: Tally.merged([p.get(key) for p in parts]) for key in parts[0].keys() | _keys(tasks)}
        metrics = {
            d: {
                m: _rounded({**_scores(whole[(m, d)], whole[("rows", d)], fids[d]), **_edit_scores(whole, m, d, job)})
                for m in MODELS
            }
            for d in job.held
        }
        details = describe(job, whole, clip, params, fid_status)
        write_outputs(reports_dir, metrics, details, _figures(job), tracker, partial, job)
    except (Interrupted, HandOverFailed) as exc:
        kept = partial.reread().kept() if partial else "the batches process 0 had written are kept, rerun to resume"
        raise with_kept("evaluate", exc, kept) from None
    return metrics


def _keys(tasks: list[Task]) -> set[tuple[str, str]]:
    return {(t.model, t.key) for t in tasks}


def _edit_scores(whole: dict[tuple[str, str], Tally], model: str, domain: str, job: Job) -> dict[str, float]:
    """``edit_fidelity_sNN`` / ``edit_clip_score_sNN`` per strength, ``mix_fidelity`` / ``mix_clip_score``."""
    out = {}
    for variant in job.variants():
        tally = whole[(model, Task(model, domain, 0, variant).key)]
        prefix, suffix = ("mix", "") if variant == MIX else ("edit", f"_{variant}")
        out[f"{prefix}_fidelity{suffix}"] = tally.mean("fidelity")
        out[f"{prefix}_clip_score{suffix}"] = tally.mean("clip")
    return out


def _scores(generated: Tally, real: Tally, fid) -> dict[str, float]:
    """clip_score, r_precision and fd_clip (and fid with its image counts) of one model's images."""
    scores = {
        "clip_score": generated.mean("clip"),
        "r_precision": generated.mean("hits"),
        "fd_clip": frechet_distance(*generated.stats.moments(), *real.stats.moments()),
    }
    if fid is not None:
        scores["fid"] = fid_from_parts(fid, real.fid_parts, generated.fid_parts)
        scores["fid_n_generated"] = int(fid.fake_features_num_samples)
        scores["fid_n_real"] = int(fid.real_features_num_samples)
    return scores


def _figures(job: Job) -> dict:
    """grid.png (real, base, tuned for the first GRID_ROWS prompts of each domain), its first
    TOP_ROWS as base_vs_tuned.png (the README's opening picture) and
    image_text.png (the first EDIT_ROWS photos of each domain, each edit variant, base and tuned),
    from the PNGs in the partial folder."""

    def read(path: Path):
        with Image.open(path) as image:
            return image.convert("RGB")

    def first(model: str, domain: str, variant: str, n: int) -> list[Image.Image]:
        return [
            read(path) for b in range(-(-n // job.batch_size)) for path in job.paths(Task(model, domain, b, variant))
        ][:n]

    grids, tops, edits = [], [], []
    for domain, h in job.held.items():
        rows = min(GRID_ROWS, len(h.prompts))
        columns = {"real": h.real_images(range(rows), job.resolution)}
        columns.update({model: first(model, domain, TEXT, rows) for model in MODELS})
        grids.append(figures.titled(domain, figures.sample_grid(h.captions[:rows], columns)))
        top = min(TOP_ROWS, rows)
        tops.append(
            figures.titled(domain, figures.sample_grid(h.captions[:top], {k: v[:top] for k, v in columns.items()}))
        )
        rows = min(EDIT_ROWS, job.count(domain, MIX))
        columns = {"photo": job.sources(domain, range(rows))}
        for model in MODELS:
            for variant in job.variants():
                label = "mix" if variant == MIX else f"{job.strength(variant):g}"
                columns[f"{model} {label}"] = first(model, domain, variant, rows)
        edits.append(
            figures.titled(
                f"{domain}: photo + edit prompt (img2img strengths, and 2.1's mix)",
                figures.sample_grid(job.edit_prompts(domain)[:rows], columns),
            )
        )
    return {
        "grid.png": figures.beside(grids),
        "base_vs_tuned.png": figures.beside(tops),
        "image_text.png": figures.beside(edits),
    }


def describe(job: Job, whole: dict[tuple[str, str], Tally], clip: ClipEncoder, params, fid_status: str) -> dict:
    """evaluation.json: the real images' own scores, and what the scores were measured on."""
    out = {}
    held = job.held
    for d, h in held.items():
        real = whole[("prompts", d)]
        r = h.candidates.shape[1]
        out[d] = {
            "prompts": len(h.prompts),
            "real_images": len(h.rows),
            "prompts_with_replacement": h.with_replacement,
            "distinct_captions": len(h.texts),
            "r_precision_candidates": r,
            "r_precision_chance": _sig(1 / r),
            "truncated_captions": clip.count_truncated(h.captions),
            "real": {"clip_score": _sig(real.mean("clip")), "r_precision": _sig(real.mean("hits"))},
            "edits": {
                "photos": job.count(d, MIX),
                "strengths": list(job.strengths),
                "mix_image_weight": job.mix_image_weight,
                **edit_references(job, d, clip),
                "prompts": job.edit_prompts(d),
            },
        }
    if params.evaluate.fid_weights and fid_status.startswith("computed"):
        fid_status += (
            f"; per domain: samples/<domain>/base and samples/<domain>/tuned vs every held-out image "
            f"of the domain (samples/<domain>/real_images.txt), at model.resolution "
            f"{params.model.resolution}x{params.model.resolution} like the generated ones"
        )
    out["fid_status"] = fid_status
    return out


def edit_references(job: Job, domain: str, clip: ClipEncoder) -> dict[str, float]:
    """What the edit scores are compared with: ``photo_clip_score``, the unedited photos against
    their edit prompts (what keeping the photo whole scores), and ``movq_fidelity``, their base
    MoVQ reconstructions against them (the most an edit can keep: every edit is decoded by it)."""
    import torch

    from fashiondiff.models.loader import load_component

    pair = job.pairs["base"]
    movq = load_component(pair.decoder, "movq", pair.decoder_key).to(job.device).eval()
    photos = job.sources(domain, range(job.count(domain, MIX)))
    rebuilt = []
    for photo in photos:  # one at a time: the same bits whatever the batch
        x = torch.from_numpy(np.asarray(photo, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            out = movq.decode(movq.encode(x.to(job.device)).latents, force_not_quantize=True).sample
        pixels = ((out[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte()
        rebuilt.append(Image.fromarray(pixels.cpu().numpy()))
    seen = clip.encode_images(photos)
    return {
        "photo_clip_score": _sig(float(pair_scores(seen, clip.encode_texts(job.edit_prompts(domain))).mean())),
        "movq_fidelity": _sig(float(pair_scores(clip.encode_images(rebuilt), seen).mean())),
    }


def _sig(x: float) -> float:
    """Six significant digits: stable diffs in ``dvc metrics diff``, no float noise."""
    return float(f"{x:.6g}")


COUNT_KEYS = ("fid_n_generated", "fid_n_real")  # image counts: reported as is


def _rounded(scores: dict) -> dict:
    return {k: int(v) if k in COUNT_KEYS else _sig(v) for k, v in scores.items()}


def write_outputs(
    reports_dir: Path, metrics: dict, details: dict, pictures: dict, tracker, partial: Partial, job: Job
) -> None:
    """samples/ (the partial folder, completed and renamed into place last), metrics.json,
    scores.json and evaluation.json (atomic files); to the tracker: the numbers of metrics.json
    and evaluation.json as ``fashiondiff.evaluate.summary`` names them (the tuned model's scores as
    ``<domain>.<metric>``, the rest as ``reference.<domain>.base.<metric>``, ...).

    ``metrics``: ``{domain: {"base": {...}, "tuned": {...}}}``. The samples are already in the
    partial folder as ``<domain>/<model>/0000.png``, ... A full disk on the way stops with one
    line, the partial folder kept: the rerun reads the samples back and writes these again.
    """
    work = partial.job.work
    for file_name, picture in pictures.items():
        with disk_full_is_an_error(work / file_name, partial.kept):
            picture.save(work / file_name, format="PNG")
    for domain, h in job.held.items():
        path = work / domain / "real_images.txt"
        with disk_full_is_an_error(path, partial.kept):
            path.write_text("".join(f"{p}\n" for p in h.rows["image"]))
    tuned = {d: by_model["tuned"] for d, by_model in metrics.items()}
    for name, value in (
        ("metrics.json", metrics),
        ("scores.json", headline(tuned, job.strengths)),
        ("evaluation.json", details),
    ):
        write_json(reports_dir / name, value)  # a full disk: fashiondiff.io's one line
    for domain in DOMAINS:  # a domain left out (no data.files.generic): its curves have no point
        for model in MODELS:
            curve = edit_curve(metrics[domain][model], job) if domain in metrics else []
            write_csv(reports_dir / "plots" / f"edits_{domain}_{model}.csv", curve)
    _publish(work, reports_dir / "samples")
    tracker.log_summary(summary_metrics(metrics, details))  # what register rebuilds from the two files
    for file_name, picture in pictures.items():  # on the pipeline's parent run too: where one looks first
        tracker.log_image(picture, f"samples/{file_name}", parent_name=file_name)
    for file_name in ("metrics.json", "evaluation.json"):
        tracker.log_artifact(str(reports_dir / file_name))


def headline(tuned: dict, strengths) -> dict:
    """scores.json, the DVC metrics `dvc exp show` leads with: per domain the tuned model's
    text -> image scores, and ``edit``: its catalogue edit at the middle strength, ``kept``
    (edit_fidelity_sNN) and ``clip`` (edit_clip_score_sNN), named short: with experiments'
    names in the first column, every longer name pushes lr out of a 200-column terminal; the
    full names are in metrics.json."""
    middle = variant_name(sorted(strengths)[len(strengths) // 2])
    out = {d: {k: v for k, v in scores.items() if not k.startswith(("edit_", "mix_"))} for d, scores in tuned.items()}
    first = tuned[DOMAINS[0]]
    out["edit"] = {"kept": first[f"edit_fidelity_{middle}"], "clip": first[f"edit_clip_score_{middle}"]}
    return out


def edit_curve(scores: dict, job: Job) -> list[dict]:
    """A model's edits on one domain, strength by strength: the `dvc plots` trade-off curve."""
    return [
        {
            "strength": s,
            "edit_clip_score": scores[f"edit_clip_score_{variant_name(s)}"],
            "edit_fidelity": scores[f"edit_fidelity_{variant_name(s)}"],
        }
        for s in sorted(job.strengths)
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(CURVE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _publish(work: Path, target: Path) -> None:
    """The finished partial folder, without its progress files, renamed to ``target``."""
    shutil.rmtree(work / PROGRESS)
    if target.exists():
        shutil.rmtree(target)
    os.replace(work, target)
