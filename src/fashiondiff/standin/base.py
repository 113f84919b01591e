"""The stand-in's ``pretrain`` stage: a tiny Kandinsky 2.1 pre-trained like the real one.

Usage (``stages/pretrain.py``)::

    pretrain_base({"catalogue": (train_h5, validation_h5), "generic": (train_h5, validation_h5)},
                  params, out="models/base", reports="reports/standin", checkpoints="checkpoints/pretrain")

The encoders (CLIP, MoVQ, M-CLIP) learn both domains' train splits (``fashiondiff.standin.pretrain``);
the prior and the U-Net learn the generic domain only, with the project's training loop
(``fashiondiff.standin.generator``; checkpoints in ``checkpoints``: a killed run resumes). Writes
``out/prior`` and ``out/decoder`` (diffusers folders), ``reports/pretrain.json`` (CLIP retrieval,
M-CLIP agreement and MoVQ reconstruction on both validation files, final losses) and
``reports/movq_reconstructions.png`` (one view per item, catalogue then generic: originals above
reconstructions). Wall-clock seconds go to the log and MLflow, never into an output.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fashiondiff.data.captions import check_template, make_caption
from fashiondiff.data.fashiongen import read_rows
from fashiondiff.embed.encoders import clip_pixels
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.standin import generator as gen
from fashiondiff.standin import pretrain as pt
from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines
from fashiondiff.tracking import stage_run

DOMAINS = ("catalogue", "generic")


def load_split(path: str, template: str):
    rows = read_rows(path, 0, 2**62)  # the whole file: the embedded default's few hundred rows
    fields = [dict(zip(rows.text, values)) for values in zip(*rows.text.values())]
    return rows.images, [make_caption(template, f) for f in fields], rows.product_ids.tolist()


def diagnostics(parts, validation: dict, resolution: int, curves: dict) -> dict:
    """What the stand-in learnt, on each domain's held-out file (no wall-clock values)."""
    captions = [c for _, caps, _ in validation.values() for c in caps]
    return {
        "retrieval": {d: pt.retrieval_accuracy(parts, *validation[d]) for d in DOMAINS},
        "mclip": pt.distillation_agreement(parts, pt.case_variants(captions)),
        "movq": {d: pt.reconstruction_error(parts.movq, validation[d][0], resolution) for d in DOMAINS},
        "final_loss": {k: float(np.mean(v[-10:])) for k, v in curves.items() if v},
    }


def reconstructions(parts, validation: dict, resolution: int) -> Image.Image:
    grids = []
    for domain in DOMAINS:
        images, _, products = validation[domain]
        first_view = np.sort(np.unique(products, return_index=True)[1])
        grids.append(pt.reconstruction_grid(parts.movq, images[first_view], resolution))
    out = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), "white")
    for k, grid in enumerate(grids):
        out.paste(grid, (0, sum(g.height for g in grids[:k])))
    return out


def pretrain_base(files: dict[str, tuple[str, str]], params, out: str, reports: str, checkpoints: str) -> None:
    """Pre-train the tiny base on ``files`` (domain -> (train .h5, validation .h5)) and write it."""
    check_template(params.data.caption)
    # The runs open first: a tracking store that does not answer stops the stage before the work.
    with stage_run("pretrain", params) as tracker:
        started = time.perf_counter()
        parts, validation, history, result = pretrain_parts(files, params, checkpoints)
        curves = {**result.losses, **{k: [p["loss"] for p in v] for k, v in history.items()}}
        report = diagnostics(parts, validation, params.model.resolution, curves)
        with atomic_dir(out) as tmp:  # prior/ and decoder/, two DVC outputs
            save_pipelines(parts, tmp)
        grid = reconstructions(parts, validation, params.model.resolution)
        with atomic_file(Path(reports) / "movq_reconstructions.png", "wb") as handle:
            grid.save(handle, format="PNG")
        write_json(Path(reports) / "pretrain.json", report)
        seconds = {**result.seconds, "total": round(time.perf_counter() - started, 1)}
        log_pretraining(tracker, report, history, seconds, grid, Path(reports) / "pretrain.json")
    r, m = report["retrieval"], report["movq"]
    print(
        "pretrain: "
        + "; ".join(
            f"{d}: CLIP top-1 {r[d]['top1']:.2f} (chance {r[d]['top1_chance']:.2f}), MoVQ PSNR {m[d]['psnr']:.1f} dB"
            for d in DOMAINS
        )
        + f"; final loss prior {report['final_loss']['prior']:.3f}, "
        f"U-Net {report['final_loss']['unet']:.3f}; {seconds['total']} s"
    )


def pretrain_parts(files: dict[str, tuple[str, str]], params, checkpoints: str):
    """The pre-trained tiny parts, the validation splits, the generator's curves and the
    encoders' result (losses, seconds)."""
    template, cfg, res = params.data.caption, params.standin.pretrain, params.model.resolution
    train = {d: load_split(files[d][0], template) for d in DOMAINS}
    validation = {d: load_split(files[d][1], template) for d in DOMAINS}
    images = np.concatenate([train[d][0] for d in DOMAINS])
    captions = [c for d in DOMAINS for c in train[d][1]]
    parts = build_tiny(pt.case_variants(captions), TinySpec(clip_image_size=params.clip_image_size), seed=params.seed)
    # Two processes, one thread each: the MoVQ and then the U-Net train in the second.
    with (
        ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool,
        tempfile.TemporaryDirectory(prefix="fashiondiff-pretrain-") as work,
    ):
        result = pt.pretrain_encoders(parts, images, captions, cfg, res, params.seed, pool=pool)
        pt.set_prior_statistics(parts, clip_pixels(parts.image_processor, train["generic"][0]))
        cache = gen.generic_cache(parts, files["generic"][0], template, params.clip_image_size, res, Path(work))
        generator_started = time.perf_counter()
        history = gen.pretrain_generator(parts, cache, cfg.generator, params.seed, checkpoints, pool)
        result.seconds["generator"] = round(time.perf_counter() - generator_started, 1)
    return parts, validation, history, result


def log_pretraining(tracker, report: dict, history: dict, seconds: dict, grid: Image.Image, report_file: Path) -> None:
    for kind, points in history.items():
        tracker.log_curve(f"{kind}_loss", [(p["step"], p["loss"]) for p in points])
    tracker.log_summary(
        {
            f"{group}.{domain}.{k}": float(v)
            for group in ("retrieval", "movq")
            for domain in DOMAINS
            for k, v in report[group][domain].items()
        }
    )
    tracker.log_summary(
        {f"{group}.{k}": float(v) for group in ("mclip", "final_loss") for k, v in report[group].items()}
    )
    tracker.log_summary({f"seconds.{k}": float(v) for k, v in seconds.items()})
    tracker.log_image(grid, "movq_reconstructions.png")
    tracker.log_artifact(report_file)
