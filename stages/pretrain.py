"""DVC stage `pretrain` (the stand-in): the embedded tiny Kandinsky 2.1, its encoders
pre-trained on the synthetic train split.

Usage: python stages/pretrain.py TRAIN_H5 VALIDATION_H5 OUT_DIR REPORT_DIR

Writes OUT_DIR/prior and OUT_DIR/decoder (diffusers folders), REPORT_DIR/pretrain.json
(CLIP retrieval, M-CLIP agreement and MoVQ reconstruction on the validation split, final
losses) and REPORT_DIR/movq_reconstructions.png (one pose per product: originals, then
reconstructions). Wall-clock seconds go to the log and MLflow, never into an output.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fashiondiff.config import seed_everything, stage_params
from fashiondiff.data.captions import check_template, make_caption
from fashiondiff.data.fashiongen import read_rows
from fashiondiff.embedded import pretrain as pt
from fashiondiff.embedded.tiny import TinySpec, build_tiny, save_pipelines
from fashiondiff.errors import cli
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.tracking import stage_run


def load_split(path: str, template: str):
    rows = read_rows(path, 0, 2**62)  # the whole file: the embedded default's few hundred rows
    fields = [dict(zip(rows.text, values)) for values in zip(*rows.text.values())]
    return rows.images, [make_caption(template, f) for f in fields], rows.product_ids.tolist()


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("train_h5", "validation_h5", "out_dir", "report_dir"):
        parser.add_argument(name)
    args = parser.parse_args(argv)
    params = stage_params("pretrain")
    check_template(params.data.caption)
    seed_everything(params.seed)
    started = time.perf_counter()
    images, captions, _ = load_split(args.train_h5, params.data.caption)
    val_images, val_captions, val_products = load_split(args.validation_h5, params.data.caption)
    parts = build_tiny(captions, TinySpec(clip_image_size=params.clip_image_size), seed=params.seed)
    result = pt.pretrain(parts, images, captions, params.embedded.pretrain, params.model.resolution,
                         params.seed, parallel=True)  # 2 processes, 1 thread each
    first_pose = np.unique(val_products, return_index=True)[1]
    report = {
        "retrieval": pt.retrieval_accuracy(parts, val_images, val_captions, val_products),
        "mclip": pt.distillation_agreement(parts, val_captions),
        "movq": pt.reconstruction_error(parts.movq, val_images, params.model.resolution),
        "final_loss": {k: float(np.mean(v[-10:])) for k, v in result.losses.items() if v},
    }
    with stage_run("pretrain", params) as tracker:
        with atomic_dir(args.out_dir) as tmp:  # prior/ and decoder/, two DVC outputs
            save_pipelines(parts, tmp)
        grid = pt.reconstruction_grid(parts.movq, val_images[np.sort(first_pose)], params.model.resolution)
        with atomic_file(Path(args.report_dir) / "movq_reconstructions.png", "wb") as handle:
            grid.save(handle, format="PNG")
        write_json(Path(args.report_dir) / "pretrain.json", report)
        seconds = {**result.seconds, "total": round(time.perf_counter() - started, 1)}
        tracker.log_summary({f"{group}.{k}": float(v) for group in ("retrieval", "mclip", "movq", "final_loss")
                             for k, v in report[group].items()})
        tracker.log_summary({f"seconds.{k}": float(v) for k, v in seconds.items()})
        tracker.log_image(grid, "movq_reconstructions.png")
    r, m = report["retrieval"], report["movq"]
    print(f"pretrain: CLIP top-1 {r['top1']:.2f} (chance {r['top1_chance']:.2f}), top-5 {r['top5']:.2f} "
          f"(chance {r['top5_chance']:.2f}); MoVQ PSNR {m['psnr']:.1f} dB; {seconds['total']} s")


if __name__ == "__main__":
    main()
