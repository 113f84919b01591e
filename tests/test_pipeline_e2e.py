"""End to end: `dvc repro` on a fresh copy of the repository with shrunken sizes; every
stage's reads and imports against dvc.yaml; `dvc exp run -S lr=...` reruns only training
and evaluation; the MLflow store; `dvc repro --force` is bit-for-bit reproducible; and a
run on "real" inputs (files no stage writes) runs no stand-in stage."""

from __future__ import annotations

import json
import os
import re
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
    "embedded": {"synthetic": {"train_products": 6, "validation_products": 3, "poses_per_product": 2,
                               "generic_train_items": 4, "generic_validation_items": 3},
                 "pretrain": {"clip_steps": 4, "movq_steps": 4, "mclip_steps": 4, "batch_size": 8,
                              "generator": {"prior_epochs": 2, "unet_epochs": 2, "batch_size": 4,
                                            "checkpoint_every": 2}}},
    "evaluate": {"num_prompts": 3, "prior_steps": 3, "batch_size": 3, "r_precision_candidates": 3},
    "train": {"checkpoint_every": 4, "log_every": 1, "warmup_steps": 0},
}


def merge(tree: dict, over: dict) -> dict:
    for key, value in over.items():
        tree[key] = merge(tree.get(key, {}), value) if isinstance(value, dict) else value
    return tree


def sh(cwd: Path, *cmd: str, **extra_env: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(cwd / "src"), "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "FASHIONDIFF_TRACKING": "on", **extra_env}
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
    sh(root, str(DVC), "repro", FASHIONDIFF_AUDIT=str(root / "audit"))
    return root


def dvc_stages(root: Path) -> dict[str, dict]:
    """Every stage of dvc.yaml and embedded/dvc.yaml by name (foreach stages once)."""
    stages = {}
    for name in ("dvc.yaml", "embedded/dvc.yaml"):
        for stage, body in yaml.safe_load((root / name).read_text())["stages"].items():
            stages[stage] = body.get("do", body)
    return stages


def lock_md5s(root: Path) -> dict[str, str]:
    """path -> md5 of every output in dvc.lock and embedded/dvc.lock."""
    found = {}
    for name in ("dvc.lock", "embedded/dvc.lock"):
        for stage in yaml.safe_load((root / name).read_text())["stages"].values():
            for out in stage.get("outs", []):
                found[out["path"]] = out["md5"]
    return found


def test_every_stage_reads_and_imports_exactly_what_dvc_yaml_declares(project):
    """The audit each stage process wrote at exit (FASHIONDIFF_AUDIT) against its declaration:
    an undeclared read fails the stage itself; here, declared-but-unread params and any
    difference between imported project modules and declared code deps fail."""
    stages = dvc_stages(project)
    seen = set()
    for record_file in sorted((project / "audit").glob("*.json")):
        record = json.loads(record_file.read_text())
        stage = stages[record["stage"]]
        seen.add(record["stage"])
        declared_code = {d for d in stage["deps"] if d.startswith("src/")}
        imported = {f"src/{m}" for m in record["modules"]}
        assert imported == declared_code, (record["stage"], sorted(imported ^ declared_code))
        declared = [p for p in stage.get("params", []) if isinstance(p, str)]
        unread = [k for k in declared if not any(r == k or r.startswith(f"{k}.") for r in record["params_read"])]
        assert not unread, (record["stage"], unread)
        assert f"stages/{record['stage'].split('@')[0]}.py" in stage["deps"]
    assert seen == set(stages), sorted(set(stages) - seen)


def test_params_comments_name_the_stages_that_declare_each_key(project):
    """params.yaml's `# read by:`-style comments: each top-level key's comment names every
    stage that declares it (or a key under it), and no other."""
    stages = dvc_stages(project)
    text = (project / "params.yaml").read_text()
    for line in text.splitlines():
        if not line or line[0] in " #" or ":" not in line or "#" not in line:
            continue
        key, comment = line.split(":", 1)[0], line.split("#", 1)[1]
        named = {s for s in stages if re.search(rf"\b{s}\b", comment.split(":")[0])}
        declaring = {s for s, body in stages.items()
                     if any(isinstance(p, str) and (p == key or p.startswith(f"{key}.")) for p in body.get("params", []))}
        assert named == declaring, (key, sorted(named), sorted(declaring))


def test_repro_leaves_every_declared_output(project):
    for path in ("data/synthetic/fashiongen_train.h5", "data/extracted/train/captions.parquet",
                 "data/cache/validation/meta.json", "models/base/prior/model_index.json",
                 "models/prior/model_index.json", "models/decoder/model_index.json",
                 "reports/samples/grid.png", "reports/samples/image_text.png",
                 "data/synthetic/generic_train.h5", "data/extracted/generic/captions.parquet",
                 "checkpoints/pretrain/unet", "reports/samples/generic/tuned/0002.png",
                 "reports/plots/train_prior.csv", "reports/plots/train_decoder.csv"):
        assert (project / path).exists(), path
    metrics = json.loads((project / "reports/metrics.json").read_text())  # the tuned model
    details = json.loads((project / "reports/evaluation.json").read_text())  # the base model and the rest
    for domain in ("catalogue", "generic"):
        assert set(metrics[domain]) == set(details[domain]["base"]) == {"clip_score", "fd_clip", "r_precision"}
    assert details["fid_status"].startswith("skipped") and details["generic"]["r_precision_chance"] == 0.333333
    shown = sh(project, str(DVC), "metrics", "show")  # the evaluation only: train summaries are plain outputs
    assert "generic.r_precision" in shown and "loss_last_epoch" not in shown and "base" not in shown


def test_lr_experiment_reruns_only_training_evaluation_and_register(project):
    out = sh(project, str(DVC), "exp", "run", "-S", "lr=0.001")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_prior", "train_decoder", "evaluate", "register"}, out
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
    assert {"train_prior", "train_decoder", "evaluate", "register"} <= children
    assert "evaluate.catalogue.fd_clip" in first.data.metrics, first.data.metrics.keys()
    assert "evaluate.reference.catalogue.base.fd_clip" in first.data.metrics
    assert "train_prior.loss_last_epoch" in first.data.metrics
    assert "pretrain.final_loss.unet" in first.data.metrics, first.data.metrics.keys()


def test_each_pipeline_run_registers_its_tuned_model_tagged_with_commit_and_experiment(project):
    """`dvc repro` registered version 1, the lr experiment version 2 (test above)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    name = yaml.safe_load((project / "params.yaml").read_text())["serve"]["registered_model"]
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"1", "2"}, sorted(versions)
    head = sh(project, "git", "rev-parse", "HEAD").strip()
    assert versions["1"].tags["dvc.exp_name"] == "repro"
    assert versions["1"].tags["mlflow.source.git.commit"] == head
    parent = client.get_run(versions["2"].tags["fashiondiff.pipeline_run"])
    assert versions["2"].tags["dvc.exp_name"] == parent.data.tags["dvc.exp_name"] != "repro"
    assert parent.data.params["lr"] == "0.001" and parent.data.metrics["register.model_version"] == 2


def test_repro_force_is_bit_for_bit_reproducible(project):
    """Same params and seed: identical metrics and an identical md5 for every output."""
    metrics = (project / "reports/metrics.json").read_bytes()
    md5s = lock_md5s(project)
    assert {"models/base/prior", "data/cache/train", "models/prior", "reports/samples"} <= set(md5s)
    sh(project, str(DVC), "repro", "--force")
    assert (project / "reports/metrics.json").read_bytes() == metrics
    changed = {p for p, md5 in lock_md5s(project).items() if md5s[p] != md5}
    assert not changed, sorted(changed)


def test_the_documented_activated_venv_form_works(project):
    """README: `source .venv/bin/activate`, then dvc (stage commands call `python` from PATH)."""
    venv = Path(sys.executable).parent.parent
    (project / ".venv").symlink_to(venv)
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(venv)))
    out = subprocess.run(["bash", "-c", "source .venv/bin/activate && dvc status && python -c 'import fashiondiff'"],
                         cwd=project, env=bare, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_real_inputs_run_no_stand_in_stage(project):
    """The paper's run in miniature: FashionGen-layout files and base folders that no stage
    writes. No stand-in stage runs; editing stand-in code leaves every real stage up to date."""
    (project / "data/raw").mkdir()
    for split in ("train", "validation"):
        shutil.copy(project / f"data/synthetic/fashiongen_{split}.h5", project / f"data/raw/fg_{split}.h5")
    for part in ("prior", "decoder"):
        shutil.copytree(project / f"models/base/{part}", project / f"models/kandinsky-{part}")
    params = yaml.safe_load((project / "params.yaml").read_text())
    shutil.copy(project / "data/synthetic/generic_validation.h5", project / "data/raw/coco_like.h5")
    params["data"]["files"] = {"train": "data/raw/fg_train.h5", "validation": "data/raw/fg_validation.h5",
                               "generic": "data/raw/coco_like.h5"}
    params["model"].update(prior="models/kandinsky-prior", decoder="models/kandinsky-decoder")
    params["serve"]["max_log_mb"] = 0  # as real weights are: too large to log (register skips it)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = sh(project, str(DVC), "repro", "--dry")
    assert "embedded/dvc.yaml" not in dry and "Running stage 'evaluate'" in dry, dry
    ran = sh(project, str(DVC), "repro")
    assert "embedded/dvc.yaml" not in ran, ran
    synthetic = project / "src/fashiondiff/embedded/synthetic.py"
    synthetic.write_text(synthetic.read_text() + "\n# an edit to the stand-in\n")
    status = sh(project, str(DVC), "status")
    stale = {line.rstrip(":") for line in status.splitlines() if line and not line.startswith(("\t", " "))}
    assert "embedded/dvc.yaml:synthesize" in stale, status
    assert all(s.startswith("embedded/dvc.yaml:") for s in stale), status
