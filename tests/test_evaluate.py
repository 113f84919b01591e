"""evaluate() end to end on tiny models and a tiny extracted split: outputs, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import replaced, repo_params
from PIL import Image

from fashiondiff.data.split import select_split
from fashiondiff.evaluate.edits import recoloured
from fashiondiff.evaluate.heldout import choose_prompts, heldout_rows
from fashiondiff.evaluate.run import ModelPair, evaluate
from fashiondiff.evaluate.summary import summary_metrics

NAMES = [
    "black leather mini skirt",
    "white cotton shirt",
    "blue denim jacket",
    "red silk dress",
    "grey wool coat",
    "green linen trousers",
    "yellow rain jacket",
    "pink knit sweater",
]
OBJECTS = ["red striped mug", "blue ball", "green lamp", "black leather bag", "white kite"]
TEXT_KEYS = {"clip_score", "fd_clip", "r_precision"}
EDIT_KEYS = {
    "edit_fidelity_s50",
    "edit_clip_score_s50",
    "edit_fidelity_s100",
    "edit_clip_score_s100",
    "mix_fidelity",
    "mix_clip_score",
}


def headline(report: dict) -> dict:
    """What scores.json holds: the tuned text scores per domain, the catalogue edit at the middle strength."""
    out = {d: {k: v for k, v in report[d]["tuned"].items() if k not in EDIT_KEYS} for d in ("catalogue", "generic")}
    tuned = report["catalogue"]["tuned"]
    out["edit"] = {"kept": tuned["edit_fidelity_s100"], "clip": tuned["edit_clip_score_s100"]}
    return out


class RecordingTracker:
    def __init__(self):
        self.summary, self.images, self.parent_images, self.artifacts = {}, [], [], []

    def log_metrics(self, metrics, step=None):
        pass

    def log_summary(self, metrics):
        self.summary.update(metrics)

    def log_image(self, image, name, parent_name=""):
        self.images.append(name)
        if parent_name:
            self.parent_images.append(parent_name)

    def log_artifact(self, path):
        self.artifacts.append(str(path))


def extracted_folder(folder, names, poses, rng, first_product=100):
    """A hand-made extracted file: random 64 px pictures, ``poses`` rows per name."""
    (folder / "images").mkdir(parents=True)
    records = []
    for row in range(len(names) * poses):
        product, pose = divmod(row, poses)
        image = f"images/{row:07d}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / image)
        records.append(
            {
                "row": row,
                "product_id": first_product + product,
                "pose": f"pose {pose}",
                "category": "CLOTHING",
                "name": names[product],
                "description": "",
                "caption": names[product],
                "image": image,
            }
        )
    pd.DataFrame(records).to_parquet(folder / "captions.parquet")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    root = tmp_path_factory.mktemp("evaluate")
    save_pipelines(build_tiny((NAMES + OBJECTS) * 2, TinySpec(clip_image_size=32, clip_patch_size=16)), root / "models")
    rng = np.random.default_rng(0)
    folders = {
        "catalogue": extracted_folder(root / "validation", NAMES, 2, rng),
        "generic": extracted_folder(root / "generic", OBJECTS, 1, rng, first_product=500),
    }
    base = repo_params()
    params = replaced(
        base,
        clip_image_size=32,
        diffusion_steps=2,
        data=replaced(base.data, holdout_fraction=0.5),
        model=replaced(base.model, resolution=64),  # MoVQ factor 8: sizes step by 64
        evaluate=replaced(
            base.evaluate,
            num_prompts=3,
            prior_steps=2,
            batch_size=2,
            r_precision_candidates=4,
            workers=1,
            edit_items=3,
            edit_strengths=[0.5, 1.0],
        ),
    )
    return root, folders, params


def run(setup, name, **evaluate_params):
    root, folders, params = setup
    params = replaced(params, evaluate=replaced(params.evaluate, **evaluate_params))
    pair = ModelPair(str(root / "models" / "prior"), str(root / "models" / "decoder"))
    tracker = RecordingTracker()
    report = evaluate(folders, pair, pair, params, root / name, tracker)
    return report, tracker


def test_evaluate_writes_metrics_and_figures(setup):
    root, folders, params = setup
    report, tracker = run(setup, "reports_a")
    everything = json.loads((root / "reports_a" / "metrics.json").read_text())
    written = json.loads((root / "reports_a" / "scores.json").read_text())
    details = json.loads((root / "reports_a" / "evaluation.json").read_text())
    # metrics.json: base and tuned per domain; scores.json (the DVC metrics): the tuned model alone
    assert everything == report
    assert written == headline(report)
    for domain in ("catalogue", "generic"):
        assert "base" not in details[domain]  # each number in one file
        assert set(written[domain]) == TEXT_KEYS  # no FID without evaluate.fid_weights
        for scores in (everything[domain]["tuned"], everything[domain]["base"]):
            assert set(scores) == TEXT_KEYS | EDIT_KEYS
            assert all(isinstance(v, float) and np.isfinite(v) for v in scores.values())
            assert all(0.0 <= v <= 100.0 for k, v in scores.items() if k != "fd_clip")
            assert scores["fd_clip"] >= 0.0 and scores["r_precision"] <= 1.0
        # base and tuned are the same folders here: same prompts and seeds give the same images
        assert everything[domain]["base"] == everything[domain]["tuned"]
        edits = details[domain]["edits"]
        assert edits["photos"] == 3 and edits["strengths"] == [0.5, 1.0] and edits["mix_image_weight"] == 0.5
        assert 0.0 <= edits["photo_clip_score"] <= 100.0 and 0.0 <= edits["movq_fidelity"] <= 100.0
        fraction = 0.5 if domain == "catalogue" else 0.0
        chosen = choose_prompts(heldout_rows(folders[domain], fraction, params.seed), 3, params.seed)
        assert edits["prompts"] == [recoloured(c) for c in chosen["caption"]]  # every caption has a colour
        for model in ("base", "tuned"):  # the dvc plots curve: one row per strength
            curve = (root / "reports_a" / "plots" / f"edits_{domain}_{model}.csv").read_text().splitlines()
            assert curve[0] == "strength,edit_clip_score,edit_fidelity" and len(curve) == 3
            assert curve[2].startswith("1.0,")
            assert curve[2].endswith(str(everything[domain][model]["edit_fidelity_s100"]))
    heldout = select_split(pd.read_parquet(folders["catalogue"] / "captions.parquet"), "validation", 0.5, params.seed)
    assert details["catalogue"]["real_images"] == len(heldout) < 16
    assert details["generic"]["real_images"] == len(OBJECTS)  # the generic file is held out whole
    for domain in ("catalogue", "generic"):
        d = details[domain]
        assert d["prompts"] == 3 and d["truncated_captions"] == 0
        assert d["r_precision_candidates"] == min(4, d["distinct_captions"])
        assert d["r_precision_chance"] == pytest.approx(1 / d["r_precision_candidates"], rel=1e-5)
        assert set(d["real"]) == {"clip_score", "r_precision"}
    assert details["fid_status"].startswith("skipped: evaluate.fid_weights is empty")
    for name, rows in (("grid.png", 3), ("base_vs_tuned.png", 3), ("image_text.png", 3)):
        with Image.open(root / "reports_a" / "samples" / name) as im:
            assert im.format == "PNG" and im.width >= 3 * 192 and im.height >= rows * 192
    samples = root / "reports_a" / "samples"
    for domain in ("catalogue", "generic"):
        for model in ("base", "tuned"):  # every generated image, lossless, prompt i = file i
            folder = samples / domain / model
            assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]
            with Image.open(folder / "0000.png") as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            for variant in ("s50", "s100", "mix"):  # every edit too: edits/<domain>/<variant>/<model>/
                folder = samples / "edits" / domain / variant / model
                assert sorted(p.name for p in folder.iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert (samples / "catalogue" / "real_images.txt").read_text().split() == heldout["image"].tolist()
    assert tracker.summary["catalogue.clip_score"] == written["catalogue"]["clip_score"]
    assert tracker.summary["catalogue.edit_fidelity_s50"] == everything["catalogue"]["tuned"]["edit_fidelity_s50"]
    assert tracker.summary["reference.generic.base.mix_clip_score"] == everything["generic"]["base"]["mix_clip_score"]
    assert tracker.summary["reference.catalogue.base.clip_score"] == everything["catalogue"]["base"]["clip_score"]
    assert tracker.summary["reference.generic.real.r_precision"] == details["generic"]["real"]["r_precision"]
    assert not any("fid_status" in k for k in tracker.summary)
    assert tracker.summary == summary_metrics(everything, details)  # register rebuilds it from the two files
    assert tracker.images == ["samples/grid.png", "samples/base_vs_tuned.png", "samples/image_text.png"]
    # the pipeline's parent run holds them too
    assert tracker.parent_images == ["grid.png", "base_vs_tuned.png", "image_text.png"]
    assert tracker.artifacts == [str(root / "reports_a" / f) for f in ("metrics.json", "evaluation.json")]


@pytest.mark.slow
def test_evaluate_is_deterministic_in_one_process_or_two(setup):
    root, _, _ = setup
    run(setup, "reports_b")
    run(setup, "reports_c", workers=2)  # base and tuned sampled in two processes at once
    for name in ("metrics.json", "scores.json", "evaluation.json", "samples/grid.png", "samples/image_text.png"):
        assert (root / "reports_b" / name).read_bytes() == (root / "reports_c" / name).read_bytes(), name
    for domain in ("catalogue", "generic"):
        for model in ("base", "tuned"):
            for sub in (Path(domain), Path("edits") / domain / "s50", Path("edits") / domain / "mix"):
                files_b = sorted((root / "reports_b" / "samples" / sub / model).iterdir())
                files_c = sorted((root / "reports_c" / "samples" / sub / model).iterdir())
                assert [f.name for f in files_b] == [f.name for f in files_c] and len(files_b) == 3
                assert all(b.read_bytes() == c.read_bytes() for b, c in zip(files_b, files_c))


@pytest.mark.slow
def test_evaluate_writes_fid_for_both_models(setup, inception_weights, tmp_path):
    """With evaluate.fid_weights: fid and its image counts for base and tuned on each domain,
    and torch-fidelity on the saved sample folder and the listed real images agrees."""
    import shutil

    import torch_fidelity

    root, folders, params = setup
    report, tracker = run(setup, "reports_fid", fid_weights=str(inception_weights))
    written = json.loads((root / "reports_fid" / "scores.json").read_text())
    everything = json.loads((root / "reports_fid" / "metrics.json").read_text())
    details = json.loads((root / "reports_fid" / "evaluation.json").read_text())
    for domain in ("catalogue", "generic"):
        real = (root / "reports_fid" / "samples" / domain / "real_images.txt").read_text().split()
        for scores in (written[domain], everything[domain]["base"]):  # tuned, base
            assert set(scores) - EDIT_KEYS == {
                "clip_score",
                "fd_clip",
                "r_precision",
                "fid",
                "fid_n_generated",
                "fid_n_real",
            }
            assert np.isfinite(scores["fid"]) and scores["fid"] > 0.0
            assert scores["fid_n_generated"] == 3 and scores["fid_n_real"] == len(real) >= 2
    assert written == headline(report)
    status = details["fid_status"]
    assert status.startswith("computed: torchmetrics FrechetInceptionDistance(feature=2048, antialias=False)")
    assert str(inception_weights) in status and "torch-fidelity" in status
    assert tracker.summary["catalogue.fid"] == written["catalogue"]["fid"]

    real = (root / "reports_fid" / "samples" / "catalogue" / "real_images.txt").read_text().split()
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for relative in real:  # already at model.resolution (64 px): no resize on either side
        shutil.copy(folders["catalogue"] / relative, real_dir / relative.replace("/", "_"))
    reference = torch_fidelity.calculate_metrics(
        input1=str(root / "reports_fid" / "samples" / "catalogue" / "tuned"),
        input2=str(real_dir),
        fid=True,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        feature_extractor_weights_path=str(inception_weights),
    )["frechet_inception_distance"]
    assert written["catalogue"]["fid"] == pytest.approx(reference, rel=1e-3)


def test_prompts_prefer_one_row_per_product():
    rows = pd.DataFrame(
        {
            "row": range(12),
            "product_id": np.repeat([1, 2, 3, 4], 3),
            "caption": [f"c{i}" for i in range(12)],
            "image": "",
        }
    )
    chosen = choose_prompts(rows, 4, seed=0)
    assert sorted(chosen["product_id"]) == [1, 2, 3, 4]
    assert choose_prompts(rows, 4, seed=0).equals(chosen)
    more = choose_prompts(rows, 6, seed=0)
    assert len(more) == 6 and more["row"].is_unique and more.head(4).equals(chosen)


def test_without_a_generic_file_evaluate_measures_the_catalogue_alone(setup):
    """params without data.files.generic: no generic key anywhere, and the generic edit curves
    (declared outputs of the stage) written with their header only."""
    root, folders, params = setup
    pair = ModelPair(str(root / "models" / "prior"), str(root / "models" / "decoder"))
    report = evaluate({"catalogue": folders["catalogue"]}, pair, pair, params, root / "alone", RecordingTracker())
    assert set(report) == {"catalogue"}
    assert set(json.loads((root / "alone/metrics.json").read_text())) == {"catalogue"}
    assert set(json.loads((root / "alone/scores.json").read_text())) == {"catalogue", "edit"}
    assert "generic" not in json.loads((root / "alone/evaluation.json").read_text())
    for model in ("base", "tuned"):
        header = "strength,edit_clip_score,edit_fidelity\n"
        assert (root / f"alone/plots/edits_generic_{model}.csv").read_text() == header
        assert len((root / f"alone/plots/edits_catalogue_{model}.csv").read_text().splitlines()) > 1
    assert not (root / "alone/samples/generic").exists()
