"""`make bench` on a machine without CUDA, or before `make repro`: a benchmark with nothing to
measure here says why in one line and exits 0, so the target runs every CPU benchmark (the
benchmarks themselves are not tests: `make bench`, docs/testing.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fashiondiff.processes import project_env

REPO = Path(__file__).resolve().parents[1]


def bench(*args: str, cwd: Path = REPO) -> str:
    """Run ``bench/<args>`` with CUDA hidden (as on a CPU machine); its one line of output."""
    done = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=project_env(CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_the_gpu_training_benchmark_skips_without_cuda():
    out = bench(str(REPO / "bench/bench_gpu_train.py"))
    assert out.splitlines() == ["bench_gpu_train: skipped: no CUDA device (--smoke checks this script on the CPU)"]


def test_the_spread_benchmark_skips_without_cuda_or_the_pipeline_s_outputs(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # a project before `make repro`
    [line] = bench(str(REPO / "bench/bench_spread.py"), "--project", str(tmp_path)).splitlines()
    assert line.startswith("bench_spread: skipped: no `dvc repro` outputs in") and "models/prior" in line, line
    [line] = bench(str(REPO / "bench/bench_spread.py"), "--fullsize").splitlines()
    assert line == "bench_spread: skipped: no CUDA device (--fullsize --tiny runs on the CPU)"
