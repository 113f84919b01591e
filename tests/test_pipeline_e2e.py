"""End to end: `dvc repro` on a fresh copy of the repository with shrunken sizes, then a
`dvc exp run -S lr=...` that reruns only training and evaluation, and the MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")

SMALL = {  # every size shrunk; the method's hyperparameters except epochs/steps kept
    "epochs": 2, "diffusion_steps": 4,
    "synthetic": {"train_products": 6, "validation_products": 3, "poses_per_product": 2},
    "base": {"clip_steps": 4, "movq_steps": 4, "mclip_steps": 4, "batch_size": 8},
    "evaluate": {"num_prompts": 3, "prior_steps": 3, "batch_size": 3},
    "train": {"checkpoint_every": 4, "log_every": 1, "warmup_steps": 0},
}


def merge(tree: dict, over: dict) -> dict:
    for key, value in over.items():
        tree[key] = merge(tree.get(key, {}), value) if isinstance(value, dict) else value
    return tree


def sh(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src"), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "FASHIONDIFF_TRACKING": "on"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone-like copy (tracked files only), small params, one commit, `dvc repro` done."""
    root = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("reports/"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), SMALL)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fixture")
    sh(root, str(DVC), "repro")
    return root


def test_repro_leaves_every_declared_output(project):
    for path in ("data/synthetic/fashiongen_train.h5", "data/extracted/train/captions.parquet",
                 "data/cache/validation/meta.json", "models/base/prior/model_index.json",
                 "models/prior/model_index.json", "models/decoder/model_index.json",
                 "reports/samples/grid.png", "reports/samples/image_text.png",
                 "reports/plots/train_prior.csv", "reports/plots/train_decoder.csv"):
        assert (project / path).exists(), path
    metrics = json.loads((project / "reports/metrics.json").read_text())
    for model in ("base", "tuned"):
        assert set(metrics[model]) >= {"clip_score", "fd_clip"}
    assert "fid" not in metrics["tuned"] and metrics["fid_status"].startswith("skipped")
    shown = sh(project, str(DVC), "metrics", "show")
    assert "tuned.fd_clip" in shown and "loss_last_epoch" in shown


def test_lr_experiment_reruns_only_training_and_evaluation(project):
    out = sh(project, str(DVC), "exp", "run", "-S", "lr=0.001")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_prior", "train_decoder", "evaluate"}, out
    table = sh(project, str(DVC), "exp", "show", "--no-pager", "--csv")
    assert "0.001" in table and "0.0005" in table


def test_one_mlflow_parent_per_pipeline_run_with_nested_stages(project):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fashiondiff.role") == "pipeline"]
    assert len(parents) >= 1
    first = min(parents, key=lambda r: r.info.start_time)
    assert first.data.params["lr"] == "0.0005" and first.data.params["data.caption"] == "{name}"
    children = {r.data.tags.get("fashiondiff.stage") for r in runs
                if r.data.tags.get("mlflow.parentRunId") == first.info.run_id}
    assert {"train_prior", "train_decoder", "evaluate"} <= children
    assert "evaluate.tuned.fd_clip" in first.data.metrics or any(
        k.endswith("tuned.fd_clip") for k in first.data.metrics), first.data.metrics.keys()


def test_repro_force_gives_identical_metrics(project):
    before = (project / "reports/metrics.json").read_bytes()
    base_before = json.loads((project / "reports/base/base_metrics.json").read_text())
    sh(project, str(DVC), "repro", "--force")
    assert (project / "reports/metrics.json").read_bytes() == before
    base_after = json.loads((project / "reports/base/base_metrics.json").read_text())
    assert base_after["retrieval"] == base_before["retrieval"] and base_after["movq"] == base_before["movq"]
