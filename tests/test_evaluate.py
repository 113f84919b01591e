"""evaluate() end to end on tiny models and a tiny extracted split: outputs, determinism."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import repo_params
from fashiondiff.data.split import select_split
from fashiondiff.evaluate.run import choose_prompts, evaluate
from inception_fixtures import inception_weights  # noqa: F401

NAMES = ["black leather mini skirt", "white cotton shirt", "blue denim jacket", "red silk dress",
         "grey wool coat", "green linen trousers", "yellow rain jacket", "pink knit sweater"]


class RecordingTracker:
    def __init__(self):
        self.summary, self.images, self.artifacts = {}, [], []

    def log_metrics(self, metrics, step=None):
        pass

    def log_summary(self, metrics):
        self.summary.update(metrics)

    def log_image(self, image, name):
        self.images.append(name)

    def log_artifact(self, path):
        self.artifacts.append(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fashiondiff.embedded.tiny import TinySpec, build_tiny, save_pipelines

    root = tmp_path_factory.mktemp("evaluate")
    save_pipelines(build_tiny(NAMES * 2, TinySpec(clip_image_size=32, clip_patch_size=16)), root / "models")
    extracted = root / "validation"
    (extracted / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for row in range(len(NAMES) * 2):  # 8 products x 2 poses
        product, pose = divmod(row, 2)
        image = f"images/{row:07d}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(extracted / image)
        records.append({"row": row, "product_id": 100 + product, "pose": f"pose {pose}",
                        "category": "CLOTHING", "name": NAMES[product], "description": "",
                        "caption": NAMES[product], "image": image})
    pd.DataFrame(records).to_parquet(extracted / "captions.parquet")
    base = repo_params()
    params = dataclasses.replace(
        base, clip_image_size=32, diffusion_steps=2,
        data=dataclasses.replace(base.data, holdout_fraction=0.5),
        model=dataclasses.replace(base.model, resolution=64),  # MoVQ factor 8: sizes step by 64
        evaluate=dataclasses.replace(base.evaluate, num_prompts=3, prior_steps=2, batch_size=2),
    )
    return root, extracted, params


def run(setup, name, **evaluate_params):
    root, extracted, params = setup
    params = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate, **evaluate_params))
    models = root / "models"
    tracker = RecordingTracker()
    report = evaluate(extracted, str(models / "prior"), str(models / "decoder"), str(models / "prior"),
                      str(models / "decoder"), params, root / name, tracker)
    return report, tracker


def test_evaluate_writes_metrics_and_figures(setup):
    root, extracted, params = setup
    report, tracker = run(setup, "reports_a")
    written = json.loads((root / "reports_a" / "metrics.json").read_text())
    assert written == report
    for side in ("base", "tuned", "delta"):
        assert set(written[side]) == {"clip_score", "fd_clip"}  # no FID without evaluate.fid_weights
        assert all(isinstance(v, float) and np.isfinite(v) for v in written[side].values())
    assert 0.0 <= written["base"]["clip_score"] <= 100.0 and written["base"]["fd_clip"] >= 0.0
    assert set(written["real"]) == {"clip_score"}
    assert written["fid_status"].startswith("skipped: evaluate.fid_weights is empty")
    assert written["num_prompts"] == 3 and written["truncated_captions"] == 0
    heldout = select_split(pd.read_parquet(extracted / "captions.parquet"), "validation", 0.5, params.seed)
    assert written["num_real_images"] == len(heldout) < 16
    # base and tuned are the same folders here: same prompts and seeds give the same images
    assert written["delta"] == {"clip_score": 0.0, "fd_clip": 0.0}
    for name, rows in (("grid.png", 3), ("image_text.png", 1)):
        with Image.open(root / "reports_a" / "samples" / name) as im:
            assert im.format == "PNG" and im.width >= 3 * 192 and im.height >= rows * 192
    samples = root / "reports_a" / "samples"
    for model in ("base", "tuned"):  # every generated image, lossless, prompt i = file i
        assert sorted(p.name for p in (samples / model).iterdir()) == ["0000.png", "0001.png", "0002.png"]
        with Image.open(samples / model / "0000.png") as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
    assert (samples / "real_images.txt").read_text().split() == heldout["image"].tolist()
    assert tracker.summary["base.clip_score"] == written["base"]["clip_score"]
    assert "fid_status" not in tracker.summary
    assert tracker.images == ["samples/grid.png", "samples/image_text.png"]
    assert tracker.artifacts == [str(root / "reports_a" / "metrics.json")]


def test_evaluate_is_deterministic(setup):
    root, _, _ = setup
    run(setup, "reports_b")
    run(setup, "reports_c")
    assert (root / "reports_b" / "metrics.json").read_bytes() == (root / "reports_c" / "metrics.json").read_bytes()
    grid_b, grid_c = (root / r / "samples" / "grid.png" for r in ("reports_b", "reports_c"))
    assert grid_b.read_bytes() == grid_c.read_bytes()
    for model in ("base", "tuned"):
        files_b = sorted((root / "reports_b" / "samples" / model).iterdir())
        files_c = sorted((root / "reports_c" / "samples" / model).iterdir())
        assert [f.name for f in files_b] == [f.name for f in files_c] and len(files_b) == 3
        assert all(b.read_bytes() == c.read_bytes() for b, c in zip(files_b, files_c))


def test_evaluate_writes_fid_for_both_models(setup, inception_weights, tmp_path):
    """With evaluate.fid_weights: fid and its image counts for base and tuned, and
    torch-fidelity on the saved sample folder and the listed real images agrees."""
    import shutil

    import torch_fidelity

    root, extracted, params = setup
    report, tracker = run(setup, "reports_fid", fid_weights=str(inception_weights))
    written = json.loads((root / "reports_fid" / "metrics.json").read_text())
    assert written == report
    real = (root / "reports_fid" / "samples" / "real_images.txt").read_text().split()
    assert written["num_real_images"] == len(real) >= 2
    for side in ("base", "tuned"):
        assert set(written[side]) == {"clip_score", "fd_clip", "fid", "fid_n_generated", "fid_n_real"}
        assert np.isfinite(written[side]["fid"]) and written[side]["fid"] > 0.0
        assert written[side]["fid_n_generated"] == 3 and written[side]["fid_n_real"] == len(real)
    assert written["delta"] == {"clip_score": 0.0, "fd_clip": 0.0, "fid": 0.0}  # same folders for both
    status = written["fid_status"]
    assert status.startswith("computed: torchmetrics FrechetInceptionDistance(feature=2048, antialias=False)")
    assert str(inception_weights) in status and "torch-fidelity" in status
    assert tracker.summary["tuned.fid"] == written["tuned"]["fid"]

    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for relative in real:  # already at model.resolution (64 px): no resize on either side
        shutil.copy(extracted / relative, real_dir / relative.replace("/", "_"))
    reference = torch_fidelity.calculate_metrics(
        input1=str(root / "reports_fid" / "samples" / "tuned"), input2=str(real_dir), fid=True, cuda=False,
        cache=False, verbose=False, save_cpu_ram=True, feature_extractor_weights_path=str(inception_weights),
    )["frechet_inception_distance"]
    assert written["tuned"]["fid"] == pytest.approx(reference, rel=1e-3)


def test_prompts_prefer_one_row_per_product():
    rows = pd.DataFrame({"row": range(12), "product_id": np.repeat([1, 2, 3, 4], 3),
                         "caption": [f"c{i}" for i in range(12)], "image": ""})
    chosen = choose_prompts(rows, 4, seed=0)
    assert sorted(chosen["product_id"]) == [1, 2, 3, 4]
    assert choose_prompts(rows, 4, seed=0).equals(chosen)
    more = choose_prompts(rows, 6, seed=0)
    assert len(more) == 6 and more["row"].is_unique and more.head(4).equals(chosen)
