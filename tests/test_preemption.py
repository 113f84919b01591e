"""Preemption-safe training: SIGTERM mid-epoch (Slurm's time limit, Kubernetes, a spot
instance) makes a training stage finish its step, save a checkpoint on every rank and exit
143 with one line; the rerun resumes from that checkpoint and ends with the same weights,
bit for bit, as a run that was never stopped. One process and two (gloo, `accelerate launch`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import REPO, run_stage, stage_params
from safetensors.torch import load_file

from fashiondiff.processes import accelerate_launch, project_env

pytestmark = pytest.mark.slow
STOP_BOUND_S = 60  # the README's bound on this machine: log_every steps, one checkpoint save, exit


def train_args(root: Path, cache: Path) -> list[str]:
    return [
        str(a)
        for a in (
            "--cache",
            cache,
            "--out",
            root / "models/prior",
            "--checkpoints",
            root / "ckpt",
            "--summary",
            root / "prior.json",
            "--plot",
            root / "prior.csv",
        )
    ]


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_epoch_checkpoints_exits_143_and_the_rerun_ends_bit_identical(
    tmp_path, tiny_base, train_cache, processes
):
    params = stage_params(tiny_base, epochs=60, **{"train.checkpoint_every": 1000, "train.log_every": 3})
    env = {"ACCELERATE_USE_CPU": "1"} if processes > 1 else {}
    cmd = accelerate_launch(processes)
    straight = tmp_path / "straight"
    run_stage(straight, params, "train_prior.py", *train_args(straight, train_cache), launcher=cmd, **env)

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "params.yaml").write_text(json.dumps(params))
    log = stopped / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*accelerate_launch(processes), str(REPO / "stages/train_prior.py"), *train_args(stopped, train_cache)],
            cwd=stopped,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=project_env(FASHIONDIFF_TRACKING="off", **env),
        )
    deadline = time.monotonic() + 180
    while "train prior:" not in log.read_text() and time.monotonic() < deadline:  # the bar: steps run
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # some steps in, mid-epoch (60 epochs of 4 or 2 steps: no checkpoint before the end)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    proc.wait(timeout=STOP_BOUND_S)
    took = time.monotonic() - signalled
    print(f"{processes} process(es): stopped {took:.1f} s after SIGTERM")  # docs/long-runs.md's figure
    text = log.read_text()
    assert proc.returncode != 0 and took < STOP_BOUND_S, (proc.returncode, took, text[-3000:])
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and "stopped by SIGTERM at step" in errors[-1] and "rerun to resume" in errors[-1], text[-3000:]
    step = int(errors[-1].split("at step ")[1].split()[0])
    assert list((stopped / "ckpt").glob(f"*/step-{step:08d}/trainer_state.json"))  # ckpt/<run fingerprint>/
    assert not (stopped / "models/prior").exists()
    if processes == 1:
        assert proc.returncode == 143

    resumed = run_stage(
        stopped,
        params,
        "train_prior.py",
        *train_args(stopped, train_cache),
        launcher=accelerate_launch(processes),
        **env,
    )
    assert f"resumed from step {step}" in resumed.stdout + resumed.stderr
    a, b = (load_file(root / "models/prior/prior/diffusion_pytorch_model.safetensors") for root in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "prior.csv").read_text() == (stopped / "prior.csv").read_text()


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(tmp_path, tiny_base, train_cache):
    """A file-size limit (``ulimit -f``: writes fail with EFBIG, as they do with ENOSPC on a full
    disk) makes a checkpoint fail: one line naming the folder, the previous checkpoint intact, no
    half-written one; the rerun without the limit resumes from it and ends bit-identical."""
    import resource

    params = stage_params(tiny_base, epochs=10, **{"train.checkpoint_every": 8, "train.log_every": 4})
    straight = tmp_path / "straight"
    run_stage(straight, params, "train_prior.py", *train_args(straight, train_cache))

    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(json.dumps(params))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages/train_prior.py"), *train_args(work, train_cache)],
        cwd=work,
        env=project_env(FASHIONDIFF_TRACKING="off"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list((work / "ckpt").glob("*/step-*")) and time.monotonic() < deadline:  # ckpt/<run fingerprint>/
        time.sleep(0.01)
    proc.kill()  # a run that saved its first checkpoint or two, then died
    proc.wait()
    kept = sorted((work / "ckpt").glob("*/step-*"))[-1]

    def small_files():  # bytes per file: the checkpoint's files are larger; the run writes no other file
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    full = subprocess.run(
        [sys.executable, str(REPO / "stages/train_prior.py"), *train_args(work, train_cache)],
        cwd=work,
        env=project_env(FASHIONDIFF_TRACKING="off"),
        capture_output=True,
        text=True,
        preexec_fn=small_files,
    )
    last = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 1 and last.startswith("error: ") and "cannot write the checkpoint of step" in last, (
        full.stderr[-2000:]
    )
    assert f"the previous checkpoint is kept ({kept})" in last and "Traceback" not in full.stderr
    assert not list((work / "ckpt").glob("*/.tmp-*")) and not (work / "models/prior").exists()
    assert sorted((work / "ckpt").glob("*/step-*"))[-1] == kept

    resumed = run_stage(work, params, "train_prior.py", *train_args(work, train_cache))
    assert f"resumed from step {int(kept.name[5:])}" in resumed.stdout + resumed.stderr
    a, b = (load_file(root / "models/prior/prior/diffusion_pytorch_model.safetensors") for root in (straight, work))
    assert all(torch.equal(a[k], b[k]) for k in a)
