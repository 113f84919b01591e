"""`train.compile: on` (torch.compile of the network's forward, the loop's default on a GPU)
follows the eager loop: the same 200-step loss curve, on the CPU here (bench/bench_gpu_train.py
compares the two on a GPU, in bf16). Off by default on the CPU: compiled kernels may change float
results, and CPU runs must reproduce bit for bit."""

from __future__ import annotations

import csv

import pytest
from pipeline_fixtures import run_stage, stage_params

pytestmark = pytest.mark.slow
STEPS = 200
TOLERANCE = 1e-3  # relative, per logged point (fp32 on the CPU: reordered sums, not bf16)


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_the_compiled_loop_follows_the_eager_one_for_200_steps(tmp_path, tiny_base, train_cache, kind):
    curves = {}
    for compile_ in ("off", "on"):
        root = tmp_path / compile_
        params = stage_params(
            tiny_base,
            epochs=STEPS // 4,
            **{"train.compile": compile_, "train.log_every": 10, "train.checkpoint_every": 1000},
        )
        run_stage(
            root,
            params,
            f"train_{kind}.py",
            "--cache",
            train_cache,
            "--out",
            root / "model",
            "--checkpoints",
            root / "ckpt",
            "--summary",
            root / "summary.json",
            "--plot",
            root / "curve.csv",
        )
        with open(root / "curve.csv") as handle:
            curves[compile_] = [float(row["loss"]) for row in csv.DictReader(handle)]
    eager, compiled = curves["off"], curves["on"]
    assert len(eager) == len(compiled) == STEPS // 10
    assert eager[-1] < eager[0]  # it learns
    gaps = [abs(a - b) / abs(a) for a, b in zip(eager, compiled)]
    assert max(gaps) < TOLERANCE, gaps
