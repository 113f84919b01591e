"""DVC stage `pretrain` (the stand-in): the embedded tiny Kandinsky 2.1, pre-trained like the real one.

Usage: python stages/pretrain.py --catalogue TRAIN_H5 VALIDATION_H5 --generic TRAIN_H5 VALIDATION_H5 \
           --out OUT_DIR --reports REPORT_DIR --checkpoints CHECKPOINT_DIR

The encoders (CLIP, MoVQ, M-CLIP) learn both domains' train splits; the prior and the U-Net
learn the generic domain only, with the project's training loop (checkpoints in
CHECKPOINT_DIR: a killed run resumes). Writes OUT_DIR/prior and OUT_DIR/decoder (diffusers
folders), REPORT_DIR/pretrain.json (CLIP retrieval, M-CLIP agreement and MoVQ reconstruction
on both validation files, final losses) and REPORT_DIR/movq_reconstructions.png (one view
per item, catalogue then generic: originals above reconstructions). Wall-clock seconds go to
the log and MLflow, never into an output.
"""

from __future__ import annotations

import argparse

from fashiondiff.config.view import stage_params
from fashiondiff.errors import cli
from fashiondiff.runtime import limit_threads, seed_everything
from fashiondiff.standin.base import DOMAINS, pretrain_base


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for domain in DOMAINS:
        parser.add_argument(f"--{domain}", nargs=2, required=True, metavar=("TRAIN_H5", "VALIDATION_H5"))
    for name in ("out", "reports", "checkpoints"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)
    limit_threads()
    params = stage_params("pretrain")
    seed_everything(params.seed)
    pretrain_base({d: tuple(getattr(args, d)) for d in DOMAINS}, params, args.out, args.reports, args.checkpoints)


if __name__ == "__main__":
    main()
