"""Validation during training (fashiondiff.train.validate): it leaves the weights alone, survives
kill -9 and resume without repeating itself, reaches MLflow (a real sqlite store) at each
validation step, runs under two gloo processes, stops them both when it fails, and draws
from the cache what the pipelines draw from the captions."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pipeline_fixtures import REPO, run_stage, stage_params
from safetensors.torch import load_file
from test_train import train_args

from fashiondiff.processes import accelerate_launch, project_env

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")  # mlflow's own

# 16 items, batch 4: 4 steps an epoch, 40 steps; a checkpoint and a validation every 10 steps.
# LoRA with dropout (draws from torch's global RNG, which validation must not move) and an EMA
# (validation swaps its weights in and back).
WATCHED = {
    "epochs": 10,
    "train.checkpoint_every": 10,
    "train.validate_every": 10,
    "train.log_every": 5,
    "train.validation_images": 2,
    "train.validation_steps": 2,
    "prior.lora_rank": 4,
    "prior.lora_dropout": 0.1,
    "train.ema_decay": 0.9,
}
VALIDATION_STEPS = [10, 20, 30, 40]


def validated(root: Path, cache: Path) -> list:
    return [
        *train_args(root, "prior", cache),
        "--val-cache",
        cache,
        "--val-plot",
        root / "validation.csv",
        "--val-pictures",
        root / "pictures",
    ]


def weights(root: Path) -> dict:
    return {
        f"{folder}/{name}": tensor
        for folder in ("prior", "lora")
        for name, tensor in load_file(next((root / "models/prior" / folder).glob("*.safetensors"))).items()
    }


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def steps_validated(output: str) -> list[int]:
    return [
        int(line.split(" at step ")[1].split(":")[0])
        for line in output.splitlines()
        if line.startswith("validation prior at step ")
    ]


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_base, train_cache):
    """The prior trained with validation on, tracked in a real sqlite MLflow store."""
    root = tmp_path_factory.mktemp("watched")
    params = stage_params(tiny_base, **WATCHED)
    params["mlflow"]["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = project_env(FASHIONDIFF_TRACKING="on")
    result = subprocess.run(
        [sys.executable, str(REPO / "stages/train_prior.py"), *map(str, validated(root, train_cache))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, params, result.stdout + result.stderr


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_validation_on_or_off_ends_with_the_same_weights(tmp_path, watched, train_cache):
    root, params, output = watched
    assert steps_validated(output) == VALIDATION_STEPS
    run_stage(tmp_path, params, "train_prior.py", *train_args(tmp_path, "prior", train_cache))  # off
    on, off = weights(root), weights(tmp_path)
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on), [k for k in on if not torch.equal(on[k], off[k])]
    assert (root / "prior.csv").read_text() == (tmp_path / "prior.csv").read_text()  # the training's own curve

    curve = (root / "validation.csv").read_text().splitlines()
    assert curve[0] == "step,val_loss,val_clip_score,val_image_embed_cosine"
    assert [int(line.split(",")[0]) for line in curve[1:]] == VALIDATION_STEPS
    summary = json.loads((root / "prior.json").read_text())
    last = dict(zip(curve[0].split(","), map(float, curve[-1].split(","))))
    assert summary["val_loss"] == last["val_loss"] and summary["val_clip_score"] == last["val_clip_score"]
    assert 0 <= summary["val_clip_score"] <= 100 and -1 <= summary["val_image_embed_cosine"] <= 1
    pictures = files(root / "pictures")
    assert set(pictures) == {"0000.png", "0001.png", "grid.png", "items.json"}
    assert json.loads(pictures["items.json"])["step"] == 40


def test_mlflow_run_has_the_curves_and_pictures_of_each_validation(watched):
    import mlflow

    root, _, _ = watched
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("fashiongen-kandinsky").experiment_id],
        filter_string="tags.`fashiondiff.stage` = 'train_prior'",
    )
    for key in ("val_loss", "val_clip_score", "val_image_embed_cosine", "validation_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted({m.step for m in history}) == VALIDATION_STEPS, key
    curve = (root / "validation.csv").read_text().splitlines()
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert logged[40] == pytest.approx(float(curve[-1].split(",")[1]))
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    stepped = sorted(int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png"))
    assert stepped == VALIDATION_STEPS, images
    assert "validation.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}
    pictures = client.list_artifacts(run.info.run_id, "validation/pictures")
    assert "validation/pictures/grid.png" in {f.path for f in pictures}
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["train_prior.val_clip_score"] == pytest.approx(float(curve[-1].split(",")[2]))


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_kill_9_and_resume_with_validation_on_repeats_none(tmp_path, watched, train_cache):
    root, params, _ = watched
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = project_env(FASHIONDIFF_TRACKING="off")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/train_prior.py"), *map(str, validated(tmp_path, train_cache))],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list((tmp_path / "ckpt/prior").glob("*/step-*")) and time.time() < deadline:  # <run fingerprint>/
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "models/prior").exists(), "killed before the end"
    resumed = run_stage(tmp_path, params, "train_prior.py", *validated(tmp_path, train_cache))
    output = resumed.stdout + resumed.stderr
    start = int(output.split("resumed from step ")[1].split()[0])
    assert start in VALIDATION_STEPS[:-1]  # a checkpoint's step is a validation step here
    assert steps_validated(output) == [s for s in VALIDATION_STEPS if s > start]  # none repeated
    on, again = weights(root), weights(tmp_path)
    assert all(torch.equal(on[k], again[k]) for k in on)
    assert (root / "validation.csv").read_text() == (tmp_path / "validation.csv").read_text()
    assert files(root / "pictures") == files(tmp_path / "pictures")
    assert (root / "prior.json").read_text() == (tmp_path / "prior.json").read_text()

    # A rerun of the finished run (as `dvc repro --force`) resumes at the end, validates nothing,
    # and writes the same outputs (the last pictures drawn again from the same weights and noise).
    shutil.rmtree(tmp_path / "pictures")
    again = run_stage(tmp_path, params, "train_prior.py", *validated(tmp_path, train_cache))
    assert steps_validated(again.stdout + again.stderr) == []
    assert files(root / "pictures") == files(tmp_path / "pictures")


def _two_processes(tmp_path: Path, params: dict, args: list, check: bool = True):
    return run_stage(
        tmp_path,
        params,
        "train_decoder.py",
        *args,
        launcher=accelerate_launch(2),
        check=check,
        timeout=300,
        ACCELERATE_USE_CPU="1",
    )


def decoder_args(root: Path, cache: Path) -> list:
    return [
        *train_args(root, "decoder", cache),
        "--val-cache",
        cache,
        "--val-plot",
        root / "validation.csv",
        "--val-pictures",
        root / "pictures",
    ]


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_two_processes_validate_on_the_main_one_and_agree(tmp_path, tiny_base, train_cache):
    params = stage_params(
        tiny_base, epochs=2, **{"train.validate_every": 4, "train.validation_images": 2, "train.validation_steps": 2}
    )
    result = _two_processes(tmp_path, params, decoder_args(tmp_path, train_cache))
    output = result.stdout + result.stderr
    assert "2 processes ended with identical weights" in output
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("validation decoder")] == [
        "validation decoder at step 4",
        "validation decoder at step 8",
    ]  # the main process's alone
    assert (tmp_path / "validation.csv").read_text().splitlines()[0] == "step,val_loss,val_clip_score"
    assert {"0000.png", "0001.png", "grid.png"} <= set(files(tmp_path / "pictures"))


@pytest.mark.slow
def test_a_validation_that_fails_ends_both_processes(tmp_path, tiny_base, train_cache):
    """The base prior's CLIP image tower (loaded at the first validation, on the main process)
    is unreadable: the main process fails with the loader's error, the other stops waiting."""
    broken = tmp_path / "base"
    shutil.copytree(tiny_base, broken)
    for f in (broken / "prior/image_encoder").glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    params = stage_params(
        broken, epochs=2, **{"train.validate_every": 2, "train.validation_images": 1, "train.validation_steps": 1}
    )
    params["model"]["decoder"] = str(tiny_base / "decoder")  # the cache's identity: only the prior moved
    shutil.copytree(train_cache, tmp_path / "cache")
    meta = json.loads((tmp_path / "cache/meta.json").read_text())
    (tmp_path / "cache/meta.json").write_text(json.dumps({**meta, "prior": params["model"]["prior"]}))
    started = time.monotonic()
    result = _two_processes(tmp_path / "run", params, decoder_args(tmp_path / "run", tmp_path / "cache"), check=False)
    assert result.returncode != 0 and time.monotonic() - started < 240
    assert "validation at step 2 failed on the main process" in result.stderr  # the waiting process
    assert "SafetensorError" in result.stderr and "in _load" in result.stderr  # the main process's own error
    assert not (tmp_path / "run/models/decoder").exists()


def test_pictures_from_the_cache_are_the_pipelines_pictures_of_the_captions(tiny_base, extracted, train_cache):
    """The validator's prior pictures (cached caption encodings, no text tower) against
    fashiondiff.sampling.text_to_image with the base pipelines fed the captions themselves."""
    from fashiondiff.cache.reader import open_cache
    from fashiondiff.config.whole import params_from_dict
    from fashiondiff.models.loader import load_decoder, load_prior
    from fashiondiff.sampling import Sampling, text_to_image
    from fashiondiff.tracking import Tracker
    from fashiondiff.train.run import make_task
    from fashiondiff.train.validate import Validator

    params = params_from_dict(stage_params(tiny_base, **{"train.validation_images": 3, "train.validation_steps": 3}))
    cache = open_cache(train_cache)
    _, task = make_task("prior", params, cache)
    validator = Validator("prior", task, cache, params, Tracker("test"))
    validator.parts = validator._load(torch.device("cpu"))
    images, scores = validator._sample(task.model, torch.device("cpu"))

    rows = pd.read_parquet(extracted / "captions.parquet").set_index("row")
    captions = rows.loc[cache.rows[validator.items], "caption"].tolist()
    prior, decoder = load_prior(str(tiny_base / "prior")), load_decoder(str(tiny_base / "decoder"))
    sampling = Sampling(
        steps=3,
        guidance_scale=params.train.validation_guidance,
        prior_steps=3,
        prior_guidance_scale=params.train.validation_guidance,
        height=64,
        width=64,
    )
    expected = text_to_image(prior, decoder, captions, [params.seed + i for i in range(3)], sampling)
    for got, want in zip(images, expected):
        difference = np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int))
        assert difference.max() <= 1, difference.max()  # 8-bit rounding of float-level differences
    assert -1 <= scores["val_image_embed_cosine"] <= 1
