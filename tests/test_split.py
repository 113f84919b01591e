"""Held-out products: stable, by product, the requested fraction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fashiondiff.data.split import heldout_mask, product_score, select_split
from fashiondiff.errors import PipelineError


def _captions(n_products: int, poses: int = 3) -> pd.DataFrame:
    ids = np.repeat(np.arange(1000, 1000 + n_products), poses)
    return pd.DataFrame({"row": np.arange(ids.size), "product_id": ids})


def test_hash_is_stable_across_runs_and_machines():
    # blake2b of "0:100000", not Python's salted hash(): this value must never change.
    assert product_score(100000, 0) == pytest.approx(0.8687775, abs=1e-7)
    assert product_score(100000, 1) != product_score(100000, 0)


def test_all_poses_of_a_product_fall_on_the_same_side():
    ids = np.random.default_rng(0).permutation(np.repeat(np.arange(500), 4))
    mask = heldout_mask(ids, 0.3, seed=5)
    for pid in np.unique(ids):
        assert len(set(mask[ids == pid])) == 1
    assert (
        mask[np.argsort(ids, kind="stable")].tolist() == heldout_mask(np.sort(ids), 0.3, seed=5).tolist()
    )  # independent of row order


def test_fraction_is_respected():
    ids = np.arange(4000)
    assert 0.22 < heldout_mask(ids, 0.25, seed=0).mean() < 0.28
    assert not heldout_mask(ids, 0.0, seed=0).any()
    assert not np.array_equal(heldout_mask(ids, 0.25, 0), heldout_mask(ids, 0.25, 1))


def test_select_split_partitions_by_product():
    captions = _captions(300)
    train = select_split(captions, "train", 0.2, seed=3)
    validation = select_split(captions, "validation", 0.2, seed=3)
    assert len(train) + len(validation) == len(captions)
    assert not set(train["product_id"]) & set(validation["product_id"])
    assert sorted([*train["row"], *validation["row"]]) == list(captions["row"])
    assert 0.1 < validation["product_id"].nunique() / 300 < 0.3


def test_fraction_zero_leaves_the_table_unchanged():
    captions = _captions(10)
    assert select_split(captions, "train", 0.0, 0) is captions
    assert select_split(captions, "validation", 0.0, 0) is captions


def test_bad_arguments_fail_with_a_clear_message():
    with pytest.raises(PipelineError, match="split"):
        select_split(_captions(2), "test", 0.1, 0)
    with pytest.raises(PipelineError, match="data.holdout_fraction"):
        heldout_mask(np.arange(3), 1.0, 0)
