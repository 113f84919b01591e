"""DVC stage `base`: the embedded tiny Kandinsky 2.1, pre-trained on the synthetic train split.

Usage: python stages/base.py TRAIN_H5 VALIDATION_H5 OUT_DIR REPORT_DIR

Writes OUT_DIR/prior and OUT_DIR/decoder (diffusers folders), REPORT_DIR/base_metrics.json
(CLIP retrieval, M-CLIP agreement and MoVQ reconstruction on the validation split, losses,
seconds) and REPORT_DIR/movq_reconstructions.png (one pose per product: originals, then
reconstructions).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from fashiondiff.config import load_params
from fashiondiff.data.extract import check_template, make_caption
from fashiondiff.data.fashiongen import read_rows
from fashiondiff.errors import PipelineError, cli
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.models import pretrain as pt
from fashiondiff.models.tiny import TinySpec, build_tiny, save_pipelines


def load_split(path: str, template: str):
    rows = read_rows(path, 0, 2**62)  # the whole file: the embedded default's few hundred rows
    fields = [dict(zip(rows.text, values)) for values in zip(*rows.text.values())]
    return rows.images, [make_caption(template, f) for f in fields], rows.product_ids.tolist()


@cli
def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise PipelineError("usage: python stages/base.py TRAIN_H5 VALIDATION_H5 OUT_DIR REPORT_DIR")
    train_h5, val_h5, out_dir, report_dir = argv
    params = load_params()
    check_template(params.data.caption)
    config = pt.PretrainConfig.from_params(params)
    started = time.perf_counter()
    torch.manual_seed(params.seed)
    images, captions, _ = load_split(train_h5, params.data.caption)
    val_images, val_captions, val_products = load_split(val_h5, params.data.caption)
    parts = build_tiny(captions, TinySpec(clip_image_size=params.clip_image_size), seed=params.seed)
    result = pt.pretrain(parts, images, captions, config, parallel=True)  # 2 processes, 1 thread each
    first_pose = np.unique(val_products, return_index=True)[1]
    report = {
        "retrieval": pt.retrieval_accuracy(parts, val_images, val_captions, val_products),
        "mclip": pt.distillation_agreement(parts, val_captions),
        "movq": pt.reconstruction_error(parts.movq, val_images, config.resolution),
        "final_loss": {k: float(np.mean(v[-10:])) for k, v in result.losses.items() if v},
        "seconds": {**result.seconds, "total": round(time.perf_counter() - started, 1)},
        "config": vars(config),
    }
    with atomic_dir(out_dir) as tmp:
        save_pipelines(parts, tmp)
    grid = pt.reconstruction_grid(parts.movq, val_images[np.sort(first_pose)], config.resolution)
    with atomic_file(Path(report_dir) / "movq_reconstructions.png", "wb") as handle:
        grid.save(handle, format="PNG")
    write_json(Path(report_dir) / "base_metrics.json", report)
    r, m = report["retrieval"], report["movq"]
    print(f"base: CLIP top-1 {r['top1']:.2f} (chance {r['top1_chance']:.2f}), top-5 {r['top5']:.2f} "
          f"(chance {r['top5_chance']:.2f}); MoVQ PSNR {m['psnr']:.1f} dB; "
          f"{report['seconds']['total']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
