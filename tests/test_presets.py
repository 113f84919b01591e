"""Issue 29's defaults that fit at any size and the preset command: checkpoints by time, the
validation interval by count, the disk checked before the first step, `fashiondiff run`'s
params and plan (its DVC side runs in tests/test_paper_run.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml
from conftest import params_tree
from pipeline_fixtures import REPO, run_stage, stage_params
from test_train import train_args

from fashiondiff.commands.run import applied, read_preset
from fashiondiff.config.whole import params_from_dict
from fashiondiff.data.split import heldout_mask
from fashiondiff.disk import Need, require
from fashiondiff.errors import PipelineError
from fashiondiff.plan import make_plan, parameters
from fashiondiff.processes import project_env
from fashiondiff.standin.synthetic import write_synthetic
from fashiondiff.train.loop import VALIDATIONS_AT_MOST, _Plan, validation_interval


@pytest.mark.parametrize(
    "value, ok",
    [
        (200, True),
        ("30m", True),
        ("1h", True),
        ("90s", True),
        ("0.5h", True),
        (0, False),
        ("soon", False),
        ("30 days", False),
        (True, False),
    ],
)
def test_checkpoint_every_takes_steps_or_a_duration(value, ok):
    tree = params_tree(train={"checkpoint_every": value})
    if ok:
        assert params_from_dict(tree).train.checkpoint_every == value
    else:
        with pytest.raises(PipelineError, match=r"train\.checkpoint_every must be a step count >= 1 or a duration"):
            params_from_dict(tree)


@pytest.mark.parametrize("value, ok", [("auto", True), (0, True), (300, True), (-1, False), ("often", False)])
def test_validate_every_takes_auto_or_steps(value, ok):
    tree = params_tree(train={"validate_every": value})
    if ok:
        assert params_from_dict(tree).train.validate_every == value
    else:
        with pytest.raises(PipelineError, match=r"train\.validate_every must be auto or a step count"):
            params_from_dict(tree)


def test_the_generic_file_is_optional_but_never_empty():
    tree = params_tree()
    del tree["data"]["files"]["generic"]
    assert params_from_dict(tree).data.files.generic is None
    with pytest.raises(PipelineError, match=r"data\.files\.generic must name a file \(leave the key out for none\)"):
        params_from_dict(params_tree(data={"files": {"generic": " "}}))


def test_auto_validation_keeps_its_forward_passes_under_5_percent_and_20_validations():
    # the paper's decoder: ~3,250 held-out images, 4 pictures x 10 steps x 2; 914 steps of 32 per epoch
    plan = _Plan(per_rank=32, steps_per_epoch=914, total=914 * 200)
    passes = 3_250 + 4 * 10 * 2
    every = validation_interval("auto", plan, passes)
    assert passes / (every * 3 * 32) <= 0.05
    assert every == max(math.ceil(passes / (0.05 * 96)), math.ceil(plan.total / VALIDATIONS_AT_MOST))
    assert plan.total // every <= VALIDATIONS_AT_MOST
    small = _Plan(per_rank=4, steps_per_epoch=4, total=8)  # a tiny run: the cost rule spaces it out
    assert validation_interval("auto", small, 48 + 80) == math.ceil(128 / (0.05 * 12))
    assert validation_interval(7, plan, passes) == 7 and validation_interval(0, plan, passes) == 0


def test_disk_shortfall_is_one_line_naming_the_place_and_the_numbers(tmp_path):
    require("train prior", [Need(tmp_path / "ckpt", 10, "3 checkpoints x 1 MB")], hint="lower it")
    with pytest.raises(PipelineError) as caught:
        require(
            "train prior",
            [
                Need(tmp_path / "ckpt" / "run", 10**18, "3 checkpoints x 1 EB"),
                Need(tmp_path / "models", 5, "the tuned model"),
            ],
            hint="lower train.checkpoints_keep",
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train prior: not enough disk: needs 1000000000.0 GB on the disk of ")
    assert f"3 checkpoints x 1 EB in {tmp_path / 'ckpt' / 'run'}, the tuned model in {tmp_path / 'models'}" in message
    assert message.endswith("free; lower train.checkpoints_keep")


def test_training_checks_the_disk_before_the_first_step(tmp_path, tiny_base, train_cache):
    params = stage_params(tiny_base, **{"train.checkpoints_keep": 10**13})  # 10^13 checkpoints: no disk holds them
    result = run_stage(tmp_path, params, "train_prior.py", *train_args(tmp_path, "prior", train_cache), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert lines[-1].startswith("error: train prior: not enough disk: needs ")
    assert "checkpoints x " in lines[-1] and "lower train.checkpoints_keep" in lines[-1]
    assert "train prior:" not in result.stdout  # no step ran
    assert not (tmp_path / "models/prior").exists() and not (tmp_path / "prior.json").exists()


def test_checkpoints_by_time_land_on_settle_points(tmp_path, tiny_base, train_cache):
    """A period shorter than a step: a checkpoint at every settle point (every log_every steps),
    so the two kept are the last step's and the settle point before it."""
    params = stage_params(
        tiny_base, epochs=3, **{"train.checkpoint_every": "0.001s", "train.log_every": 2, "train.checkpoints_keep": 2}
    )
    run_stage(tmp_path, params, "train_prior.py", *train_args(tmp_path, "prior", train_cache))
    steps = json.loads((tmp_path / "prior.json").read_text())["steps"]
    kept = sorted(p.name for p in (tmp_path / "ckpt/prior").glob("*/step-*"))
    assert kept == [f"step-{steps - 2:08d}", f"step-{steps:08d}"]


def test_preset_params_are_checked_before_dvc_starts(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"name": "p", "params": {"train.warmup_step": 3}}))
    name, settings = read_preset(preset, ["lr=0.001"])
    assert name == "p" and settings == {"train.warmup_step": 3, "lr": 0.001}
    with pytest.raises(PipelineError, match=r"p\.yaml: params key train\.warmup_step: not in params\.yaml"):
        applied(params_tree(), settings, preset)
    tree = applied(params_tree(), {"data.files.generic": None, "lr": 0.001}, preset)
    assert "generic" not in tree["data"]["files"] and tree["lr"] == 0.001
    run = subprocess.run(
        [sys.executable, "-m", "fashiondiff", "run", "nothing-here"],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == "error: presets/nothing-here.yaml: no such preset (presets: paper)"


def test_plan_counts_rows_steps_and_disk_from_the_files(tmp_path, tiny_base):
    h5 = write_synthetic(tmp_path / "cat.h5", n_products=30, poses_per_product=2, seed=3)
    tree = params_tree(
        epochs=5,
        batch_size=4,
        seed=0,
        data={"holdout_fraction": 0.2, "files": {"train": str(h5), "validation": str(h5)}},
        model={"prior": str(tiny_base / "prior"), "decoder": str(tiny_base / "decoder")},
    )
    del tree["data"]["files"]["generic"]
    plan = make_plan(params_from_dict(tree), root=REPO)
    import h5py

    with h5py.File(h5) as f:
        ids = f["input_productID"][:].reshape(-1)
    held = int(heldout_mask(ids, 0.2, 0).sum())
    assert 0 < held < 60
    text = plan.text()
    assert f"data: {60 - held:,} training images of 60 in {h5} ({held:,} held out" in text
    per_epoch = (60 - held) // 4
    assert f"steps: {5 * per_epoch:,} per model (5 epochs x {per_epoch:,} steps of 4: one process)" in text
    assert "hours, extrapolated (if the models are Kandinsky 2.1 at 256 px)" in text
    assert "left out: data loading, checkpoints, validation, embed, evaluate" in text
    trained = parameters(tiny_base / "decoder" / "unet")
    assert trained > 0 and f"3 checkpoints of {trained / 1e6:,.1f} M parameters" in text
    # batch_size is the global batch: more processes split it, the steps stay the method's
    tree["compute"]["launcher"] = "accelerate launch --multi_gpu --num_processes 2"
    tree["train"]["gradient_accumulation_steps"] = 2
    text = make_plan(params_from_dict(tree), root=REPO).text()
    assert f"(5 epochs x {per_epoch:,} steps of 4: 2 per process x 2 processes, 2 micro-batches of 1 each)" in text
    tree["batch_size"] = 6
    with pytest.raises(
        PipelineError,
        match=r"^params: batch_size 6 \(the global batch\) does not divide into "
        r"2 processes x 2 accumulated micro-batches: use a multiple of 4$",
    ):
        make_plan(params_from_dict(tree), root=REPO)
    assert not plan.short
