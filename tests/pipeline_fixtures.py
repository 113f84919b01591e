"""Session fixtures for the embed and training tests: a real extracted split, real
tiny Kandinsky 2.1 folders (random weights: fast), a real cache, and a runner for
the stage scripts in a scratch folder with its own params.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import merge, params_tree

from fashiondiff.data.extract import extract
from fashiondiff.processes import project_env
from fashiondiff.standin.synthetic import write_synthetic
from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

REPO = Path(__file__).resolve().parents[1]
TINY_SPEC = TinySpec(clip_image_size=64, clip_patch_size=16)


@pytest.fixture(scope="session")
def extracted(tmp_path_factory) -> Path:
    """8 products x 2 poses, extracted: captions.parquet + PNGs."""
    root = tmp_path_factory.mktemp("extracted")
    h5 = write_synthetic(root / "train.h5", n_products=8, poses_per_product=2, seed=1)
    extract(h5, root / "train", "{name}", 16, 1)
    return root / "train"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, extracted) -> Path:
    """models/base-like folder holding prior/ and decoder/ (random tiny weights)."""
    out = tmp_path_factory.mktemp("base")
    captions = pd.read_parquet(extracted / "captions.parquet")["caption"].tolist()
    save_pipelines(build_tiny(captions, TINY_SPEC, seed=0), out)
    return out


def stage_params(base: Path, **overrides) -> dict:
    """The repository's params, shrunk for the tiny model, with ``overrides`` (dotted keys)."""
    small = {
        "epochs": 2,
        "batch_size": 4,
        "clip_image_size": TINY_SPEC.clip_image_size,
        "seed": 0,
        "model": {"prior": str(base / "prior"), "decoder": str(base / "decoder"), "resolution": 64},
        "embed": {"batch_size": 3},  # 8 captions, 16 images: short last batches, an uneven split
        "train": {"checkpoint_every": 2, "log_every": 1, "warmup_steps": 1},
    }
    return merge(params_tree(**small), overrides)


def run_stage(
    cwd: Path,
    params: dict,
    script: str,
    *args: str,
    launcher: list[str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    **env: str,
) -> subprocess.CompletedProcess:
    """Run ``stages/<script>`` in ``cwd`` with ``params`` written to cwd/params.yaml; MLflow
    tracking off unless ``env`` (more environment variables) turns it on."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = (launcher or [sys.executable]) + [str(REPO / "stages" / script), *map(str, args)]
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=project_env(**{"FASHIONDIFF_TRACKING": "off", **env}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        # under `accelerate launch` the last lines are rank 0's; a crashed rank's own error is earlier
        errors = "\n".join(line for line in result.stderr.splitlines() if "Error" in line)[-3000:]
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stderr[-3000:]}\n-- every error line --\n{errors}"
        )
    return result


@pytest.fixture(scope="session")
def train_cache(tmp_path_factory, tiny_base, extracted) -> Path:
    """A finished embedding cache of the extracted split (made by the embed stage)."""
    work = tmp_path_factory.mktemp("cache")
    run_stage(work, stage_params(tiny_base), "embed.py", extracted, "train", work / "cache")
    return work / "cache"
