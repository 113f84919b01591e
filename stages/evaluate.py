"""DVC stage `evaluate`: base vs tuned Kandinsky 2.1 on held-out captions -> metrics, samples.

Usage: python stages/evaluate.py CAPTIONS_DIR TUNED_DIR REPORTS_DIR

The base model is params ``model.prior`` / ``model.decoder`` (folders or cached Hub ids);
the tuned one is ``TUNED_DIR/prior`` and ``TUNED_DIR/decoder``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fashiondiff.config import seed_everything, stage_params
from fashiondiff.errors import PipelineError, cli
from fashiondiff.evaluate.run import evaluate
from fashiondiff.tracking import stage_run

FID_WEIGHTS_DIR = "weights/inception"  # a dep of this stage in dvc.yaml: new weights rerun it


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("captions_dir", help="extracted held-out split (captions.parquet + images/)")
    parser.add_argument("tuned_dir", help="folder with the tuned prior/ and decoder/")
    parser.add_argument("reports_dir", help="where metrics.json and samples/ go")
    args = parser.parse_args(argv)
    params = stage_params("evaluate")
    weights = params.evaluate.fid_weights
    if weights and Path(weights).parent != Path(FID_WEIGHTS_DIR):
        raise PipelineError(f"params: evaluate.fid_weights must be a file in {FID_WEIGHTS_DIR}/, the folder "
                            f"this stage declares as a dependency in dvc.yaml (got {weights})")
    seed_everything(params.seed)
    tuned = Path(args.tuned_dir)
    with stage_run("evaluate", params) as tracker:
        report = evaluate(args.captions_dir, params.model.prior, params.model.decoder,
                          str(tuned / "prior"), str(tuned / "decoder"), params, args.reports_dir, tracker)
    print(f"evaluate: base {report['base']}, tuned {report['tuned']}; fid {report['fid_status']}")


if __name__ == "__main__":
    main()
