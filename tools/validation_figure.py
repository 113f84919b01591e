"""The README's picture of validation over steps: reports/figures/validation_over_steps.png.

Usage: python tools/validation_figure.py [--tracking-uri URI] [--captions DIR] [--out FILE]

Reads, from the MLflow store (params.yaml's mlflow.*, or --tracking-uri), the newest live
``train_decoder`` and ``train_prior`` stage runs that logged validation pictures
(docs/monitoring.md) and lays each out as one grid: a row per held-out item, its caption above
it (from DIR/captions.parquet, the rows the run's ``validation/<kind>/items.json`` names),
the item as MoVQ decodes its cached latents first, then the pictures of up to --columns
validation steps (every k-th, the last included), left to right. Decoder above, prior below.

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

KINDS = {
    "decoder": "decoder: drawn from the items' true CLIP image embeddings",
    "prior": "prior: captions -> image embeddings -> the base decoder draws them",
}
STEP = re.compile(r"\+step\+(\d+)\+")
CELL = 128  # pixels per picture (the embedded default draws 64: nearest-neighbour, twice)


def newest_run(client, experiment_id: str, kind: str):
    """The newest live stage run of ``train_<kind>`` with validation pictures."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`fashiondiff.stage` = 'train_{kind}'",
        order_by=["attributes.start_time DESC"],
    )
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
    return [
        [
            grid.crop((pad + c * (w + pad), pad + r * (h + pad), pad + c * (w + pad) + w, pad + r * (h + pad) + h))
            for c in range(columns)
        ]
        for r in range(2)
    ]


def kind_figure(client, run, kind: str, captions_dir: Path, work: Path, columns: int):
    """One run's pictures: a row per item (its caption above), held-out first, then the steps."""
    import pandas as pd
    from PIL import Image

    from fashiondiff.evaluate.figures import titled

    run_id = run.info.run_id
    [folder] = [f.path for f in client.list_artifacts(run_id, "validation") if f.is_dir]  # validation/<kind>
    items = json.loads(Path(client.download_artifacts(run_id, f"{folder}/items.json", str(work))).read_text())["items"]
    pngs = sorted(
        (f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")),
        key=lambda p: int(STEP.search(p).group(1)),
    )
    every = -(-len(pngs) // columns)  # every k-th validation, counted back from the last
    table: dict[str, list] = {}
    for path in pngs[len(pngs) - 1 :: -every][::-1]:
        with Image.open(client.download_artifacts(run_id, path, str(work))) as grid:
            held_out, drawn = cut(grid.convert("RGB"), len(items))
        table.setdefault("held-out (MoVQ)", held_out)
        table[f"step {STEP.search(path).group(1)}"] = drawn
    rows = pd.read_parquet(captions_dir / "captions.parquet").set_index("row")
    captions = [str(rows.loc[item["row"], "caption"]) for item in items]
    return titled(KINDS[kind], layout(captions, table))


def layout(captions: list[str], table: dict[str, list], cell: int = CELL, pad: int = 6):
    """Columns titled by ``table``'s keys; per caption, a line of text and a row of pictures."""
    from PIL import Image, ImageDraw

    from fashiondiff.evaluate.figures import fit, font, wrap

    face, line = font(), 18
    width = pad + len(table) * (cell + pad)
    sheet = Image.new("RGB", (width, line + pad + len(captions) * (line + cell + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(table):
        draw.text((pad + c * (cell + pad), 0), title, fill="black", font=face)
    for r, caption in enumerate(captions):
        y = line + pad + r * (line + cell + pad)
        draw.text((pad, y), wrap(f"{r + 1}. {caption}", face, width - 2 * pad, max_lines=1)[0], fill="black", font=face)
        for c, images in enumerate(table.values()):
            sheet.paste(fit(images[r], cell), (pad + c * (cell + pad), y + line))
    return sheet


def stacked(panels: list):
    """``panels`` top to bottom, a gap between them."""
    from PIL import Image

    gap = 24
    sheet = Image.new(
        "RGB", (max(p.width for p in panels), sum(p.height for p in panels) + gap * (len(panels) - 1)), "white"
    )
    y = 0
    for panel in panels:
        sheet.paste(panel, (0, y))
        y += panel.height + gap
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: params.yaml's mlflow.tracking_uri")
    parser.add_argument(
        "--captions",
        default="data/extracted/validation",
        help="the held-out split's extracted folder (its captions.parquet)",
    )
    parser.add_argument("--out", default="reports/figures/validation_over_steps.png")
    parser.add_argument(
        "--columns", type=int, default=6, help="at most this many validation steps, every k-th, the last included"
    )
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient
    from PIL import Image

    from fashiondiff.config.whole import load_params
    from fashiondiff.tracking import quiet_mlflow, resolve_tracking_uri

    quiet_mlflow()
    params = load_params()
    client = MlflowClient(tracking_uri=resolve_tracking_uri(args.tracking_uri or params.mlflow.tracking_uri))
    experiment = client.get_experiment_by_name(params.mlflow.experiment)
    if experiment is None:
        sys.exit(f"error: no MLflow experiment {params.mlflow.experiment!r}; run the pipeline first")
    with tempfile.TemporaryDirectory(prefix="validation-figure-") as work:
        panels = [
            kind_figure(
                client,
                newest_run(client, experiment.experiment_id, kind),
                kind,
                Path(args.captions),
                Path(work),
                args.columns,
            )
            for kind in KINDS
        ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure = stacked(panels)
    # 256 colours (like the README's screenshots): a third of the bytes, no visible change at this size
    figure.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
