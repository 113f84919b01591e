"""DVC stage `evaluate`: base vs tuned Kandinsky 2.1 on held-out captions of two domains.

Usage: python stages/evaluate.py --catalogue DIR --generic DIR --tuned TUNED_DIR --reports REPORTS_DIR

DIRs are extracted held-out files (captions.parquet + images/): the catalogue's and the generic
domain's; the generic one is read only when params ``data.files`` names a generic file (without
one, the generic domain is skipped and the stage says so). The base model is params
``model.prior`` / ``model.decoder`` (folders or cached Hub ids); the tuned one is
``TUNED_DIR/prior`` and ``TUNED_DIR/decoder``. Runs as is, or under `accelerate launch` (params
compute.launcher): each process samples a share of the prompts, process 0 writes the reports
(docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fashiondiff.config.view import stage_params
from fashiondiff.errors import PipelineError, cli
from fashiondiff.evaluate.run import DOMAINS, ModelPair, evaluate
from fashiondiff.runtime import limit_threads, seed_everything
from fashiondiff.spread import Ranks, stop_on_signals
from fashiondiff.tracking import stage_run

FID_WEIGHTS_DIR = "weights/inception"  # a dep of this stage in dvc.yaml: new weights rerun it


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for domain in DOMAINS:
        parser.add_argument(
            f"--{domain}",
            required=True,
            metavar="DIR",
            help=f"the {domain}'s extracted held-out file (captions.parquet + images/)",
        )
    parser.add_argument("--tuned", required=True, metavar="DIR", help="folder with the tuned prior/ and decoder/")
    parser.add_argument(
        "--reports",
        required=True,
        metavar="DIR",
        help="where metrics.json, scores.json, evaluation.json and samples/ go",
    )
    args = parser.parse_args(argv)
    with stop_on_signals():  # SIGTERM/SIGINT: stop, keep the finished batches
        limit_threads()
        params = stage_params("evaluate")
        weights = params.evaluate.fid_weights
        if weights and Path(weights).parent != Path(FID_WEIGHTS_DIR):
            raise PipelineError(
                f"params: evaluate.fid_weights must be a file in {FID_WEIGHTS_DIR}/, the folder "
                f"this stage declares as a dependency in dvc.yaml (got {weights})"
            )
        seed_everything(params.seed)
        ranks = Ranks.start("evaluate", params.compute.timeout_s)
        if not ranks.main:  # process 0 alone tracks
            os.environ["FASHIONDIFF_TRACKING"] = "off"
        tuned = Path(args.tuned)
        base = ModelPair(params.model.prior, params.model.decoder)
        tuned = ModelPair(str(tuned / "prior"), str(tuned / "decoder"), "tuned prior", "tuned decoder")
        folders = {d: getattr(args, d) for d in DOMAINS if d != "generic" or params.data.files.generic is not None}
        if "generic" not in folders and ranks.main:
            print(
                "evaluate: params data.files has no generic file: the generic domain (what fine-tuning keeps "
                "of what the base drew) is skipped, the catalogue alone is measured"
            )
        with stage_run("evaluate", params) as tracker:
            metrics = evaluate(folders, base, tuned, params, args.reports, tracker, ranks)
        ranks.close()
        for domain, models in (metrics or {}).items():
            print(
                f"evaluate {domain}: "
                + "; ".join(
                    f"{m} " + ", ".join(f"{k} {v:g}" for k, v in scores.items()) for m, scores in models.items()
                )
            )


if __name__ == "__main__":
    main()
