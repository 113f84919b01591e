"""Shared fixtures: small, real FashionGen-layout HDF5 files (no mocks)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: see below
os.environ.setdefault("MKL_CBWR", "AUTO")  # before MKL's first call, as the stages (fashiondiff.runtime)

import h5py
import numpy as np
import pytest
import torch
import yaml

# One intra-op thread, as the stages use on a CPU (fashiondiff.errors.cli): with two,
# OpenMP threads spin against any other process and a tiny model's step can take 20x
# longer on a 2-core machine.
torch.set_num_threads(1)

from fashiondiff.config.whole import Params, params_from_dict  # noqa: E402 - after the thread setting
from fashiondiff.standin.synthetic import write_synthetic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# The shared fixtures, for every test file to request by name (none imports them): session
# fixtures, each built at most once per pytest process.
pytest_plugins = ("pipeline_fixtures", "serving_fixtures", "inception_fixtures")


# With `make test`'s workers, the longest files start first (measured: e2e ~440 s, spread ~200 s,
# paper run ~150 s, tracking ~115 s, preemption ~100 s, train ~95 s, in a 2-worker run; sweep
# ~450 s alone on a loaded machine), so the short ones fill in at the end instead of one long
# file running alone.
SLOWEST_FIRST = (
    "test_pipeline_e2e.py",
    "test_sweep.py",
    "test_spread.py",
    "test_paper_run.py",
    "test_tracking.py",
    "test_preemption.py",
    "test_train.py",
    "test_compile.py",
    "test_validate.py",
    "test_fullsize.py",
)


def pytest_collection_modifyitems(items) -> None:
    """Run the slowest test files first, longest first: pytest-xdist hands files out in collection
    order, and a long file handed out last would leave one worker idle while the other finishes it."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def merge(tree: dict, over: dict) -> dict:
    """``tree`` updated in place by the nested ``over`` (dotted keys allowed at any level)."""
    for key, value in over.items():
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = merge(node.get(last, {}), value) if isinstance(value, dict) else value
    return tree


def replaced(section, **changes):
    """A params section with ``changes`` (like dataclasses.replace; not validated again, so a test
    can hand a library function a value params.yaml would refuse)."""
    return section.model_copy(update=changes)


def params_tree(**overrides) -> dict:
    """The repository's params.yaml as a dict, with ``overrides`` (dotted keys) applied."""
    return merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)


def repo_params(**overrides) -> Params:
    """The repository's params (the one source of values), validated, with overrides."""
    return params_from_dict(params_tree(**overrides))


@pytest.fixture(scope="session")
def synthetic_h5(tmp_path_factory) -> Path:
    """A tiny synthetic train file: 6 products x 2 poses = 12 rows, seed 0. Read-only."""
    return write_synthetic(
        tmp_path_factory.mktemp("synthetic") / "fashiongen_train.h5", n_products=6, poses_per_product=2, seed=0
    )


def _bytes(values) -> np.ndarray:
    """(N, 1) fixed-length byte strings; str values are encoded latin-1, like FashionGen."""
    encoded = [v.encode("latin-1") if isinstance(v, str) else v for v in values]
    width = max((len(b) for b in encoded), default=1) or 1
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


@pytest.fixture
def make_h5():
    """``make_h5(path, n=4, **datasets)``: a hand-made FashionGen-layout file.

    Defaults: random uint8 pictures (16x16 to stay small), names "item <i>",
    descriptions "description <i>", product ids 10 + i // 2. A keyword set to a list of
    str becomes a latin-1 (N, 1) byte-string key, to an array is written as is, to None
    is left out.
    """

    def make(path: Path, n: int = 4, **datasets) -> Path:
        rng = np.random.default_rng(n)
        base = {
            "input_image": rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8),
            "input_name": [f"item {i}" for i in range(n)],
            "input_description": [f"description {i}" for i in range(n)],
            "input_pose": [f"id_gridfs_{1 + i % 2}" for i in range(n)],
            "input_productID": (10 + np.arange(n) // 2).reshape(-1, 1),
        }
        base.update(datasets)
        with h5py.File(path, "w") as f:
            for key, value in base.items():
                if value is None:
                    continue
                f.create_dataset(key, data=_bytes(value) if isinstance(value, list) else value)
        return path

    return make
