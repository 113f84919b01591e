"""DVC stage `base`: the embedded tiny Kandinsky 2.1, pre-trained on the synthetic train split.

Usage: python stages/base.py TRAIN_H5 VALIDATION_H5 OUT_DIR REPORT_DIR

Writes OUT_DIR/prior and OUT_DIR/decoder (diffusers folders), REPORT_DIR/base_metrics.json
(CLIP retrieval on the validation split, MoVQ reconstruction error) and
REPORT_DIR/movq_reconstructions.png.
"""

import sys
import time
from pathlib import Path

from fashiondiff.config import load_params
from fashiondiff.data.extract import make_caption
from fashiondiff.data.fashiongen import read_rows
from fashiondiff.errors import PipelineError, cli
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.models import pretrain as pt
from fashiondiff.models.tiny import TinySpec, build_tiny, save_pipelines


def load_split(path: str, template: str):
    rows = read_rows(path, 0, 2**62)  # the whole (small, synthetic) file
    fields = [dict(zip(rows.text, values)) for values in zip(*rows.text.values())]
    return rows.images, [make_caption(template, f) for f in fields], rows.product_ids.tolist()


@cli
def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise PipelineError("usage: python stages/base.py TRAIN_H5 VALIDATION_H5 OUT_DIR REPORT_DIR")
    train_h5, val_h5, out_dir, report_dir = argv
    params = load_params()
    started = time.perf_counter()
    images, captions, _ = load_split(train_h5, params.data.caption)
    parts = build_tiny(captions, TinySpec(clip_image_size=params.clip_image_size), seed=params.seed)
    pt.pretrain(parts, images, captions, pt.PretrainConfig.from_params(params))
    val_images, val_captions, val_products = load_split(val_h5, params.data.caption)
    resolution = params.model.resolution
    report = {
        "retrieval": pt.retrieval_accuracy(parts, val_images, val_captions, val_products),
        "movq": pt.reconstruction_error(parts.movq, val_images, resolution),
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_dir(out_dir) as tmp:
        save_pipelines(parts, tmp)
    Path(report_dir).mkdir(parents=True, exist_ok=True)
    with atomic_file(Path(report_dir) / "movq_reconstructions.png", "wb") as handle:
        pt.reconstruction_grid(parts.movq, val_images, resolution).save(handle, format="PNG")
    write_json(Path(report_dir) / "base_metrics.json", report)
    r = report["retrieval"]
    print(f"base: CLIP top-1 {r['top1']:.2f} (chance {r['top1_chance']:.2f}), top-5 {r['top5']:.2f}; "
          f"MoVQ PSNR {report['movq']['psnr']:.1f} dB; {report['seconds']} s")


if __name__ == "__main__":
    main(sys.argv[1:])
