"""The README's picture of validation over steps: reports/figures/validation_over_steps.png.

Usage: python tools/validation_figure.py [--tracking-uri URI] [--captions DIR] [--out FILE]

Reads, from the MLflow store (params.yaml's mlflow.*, or --tracking-uri), the newest live
``train_decoder`` and ``train_prior`` stage runs that logged validation pictures
(docs/monitoring.md) and lays each out as one grid: a row per held-out item, its caption above
it (from DIR/captions.parquet, the rows the run's ``validation/<kind>/items.json`` names),
the item as MoVQ decodes its cached latents first, then the picture drawn at each validation
step, left to right. The grids go side by side, decoder first.

The README's picture comes from a run with more frequent validation than the default, e.g.
``dvc exp run -S train.validate_every=50`` (then ``python tools/validation_figure.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

KINDS = {"decoder": "decoder: drawn from the items' true CLIP image embeddings",
         "prior": "prior: captions -> image embeddings -> the base decoder draws them"}
STEP = re.compile(r"\+step\+(\d+)\+")


def newest_run(client, experiment_id: str, kind: str):
    """The newest live stage run of ``train_<kind>`` with validation pictures."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`fashiondiff.stage` = 'train_{kind}'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if any(f.path.endswith(".png") for f in client.list_artifacts(run.info.run_id, "images")):
            return run
    sys.exit(f"error: no train_{kind} run with validation pictures in the store; run the pipeline first")


def cut(grid, columns: int):
    """A validation grid (fashiondiff.train.validate.picture_grid: held-out above, drawn below)
    back into its two rows of pictures."""
    from fashiondiff.train.validate import GRID_PAD as pad

    w = (grid.width - pad) // columns - pad
    h = (grid.height - pad) // 2 - pad
    return [[grid.crop((pad + c * (w + pad), pad + r * (h + pad), pad + c * (w + pad) + w, pad + r * (h + pad) + h))
             for c in range(columns)] for r in range(2)]


def kind_figure(client, run, kind: str, captions_dir: Path, work: Path):
    import pandas as pd
    from PIL import Image

    from fashiondiff.evaluate.figures import sample_grid, titled

    run_id = run.info.run_id
    items = json.loads(Path(client.download_artifacts(run_id, f"validation/{kind}/items.json", str(work)))
                       .read_text())["items"]
    pngs = sorted((f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")),
                  key=lambda p: int(STEP.search(p).group(1)))
    columns: dict[str, list] = {}
    for path in pngs:
        with Image.open(client.download_artifacts(run_id, path, str(work))) as grid:
            held_out, drawn = cut(grid.convert("RGB"), len(items))
        columns.setdefault("held-out", held_out)
        columns[f"step {STEP.search(path).group(1)}"] = drawn
    table = pd.read_parquet(captions_dir / "captions.parquet").set_index("row")
    captions = [str(table.loc[item["row"], "caption"]) for item in items]
    return titled(KINDS[kind], sample_grid(captions, columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: params.yaml's mlflow.tracking_uri")
    parser.add_argument("--captions", default="data/extracted/validation",
                        help="the held-out split's extracted folder (its captions.parquet)")
    parser.add_argument("--out", default="reports/figures/validation_over_steps.png")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from fashiondiff.config.schema import load_params
    from fashiondiff.evaluate.figures import beside
    from fashiondiff.tracking import quiet_mlflow, resolve_tracking_uri

    quiet_mlflow()
    params = load_params()
    client = MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri or params.mlflow.tracking_uri))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        sys.exit(f"error: no MLflow experiment {params.mlflow.experiment!r}; run the pipeline first")
    with tempfile.TemporaryDirectory(prefix="validation-figure-") as work:
        panels = [kind_figure(client, newest_run(client, experiment.experiment_id, kind), kind,
                              Path(args.captions), Path(work)) for kind in KINDS]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    beside(panels).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
