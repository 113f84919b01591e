"""Hold out products, not rows: every pose of a product falls on the same side.

A product is held out iff a stable hash of ``"{seed}:{product_id}"`` (blake2b, not
Python's salted ``hash()``) maps below ``fraction``, so the split is the same on
every machine and run, and independent of row order.

Usage::

    train = select_split(captions, "train", fraction=0.1, seed=0)
    validation = select_split(captions, "validation", fraction=0.1, seed=0)
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from fashiondiff.errors import PipelineError

SPLITS = ("train", "validation")


def product_score(product_id: int, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, product id)."""
    digest = hashlib.blake2b(f"{seed}:{int(product_id)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def heldout_mask(product_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True where the row's product is held out."""
    if not 0.0 <= fraction < 1.0:
        raise PipelineError(f"params: data.holdout_fraction must be in [0, 1), got {fraction}")
    product_ids = np.asarray(product_ids)
    if fraction == 0.0 or product_ids.size == 0:
        return np.zeros(product_ids.shape, dtype=bool)
    unique, inverse = np.unique(product_ids, return_inverse=True)
    held = np.array([product_score(pid, seed) < fraction for pid in unique], dtype=bool)
    return held[inverse].reshape(product_ids.shape)


def select_split(captions: pd.DataFrame, split: str, fraction: float, seed: int) -> pd.DataFrame:
    """The rows of ``captions`` (which has a ``product_id`` column) that belong to ``split``.

    ``fraction == 0``: the table unchanged (the two splits come from separate files).
    Otherwise train drops the held-out products and validation keeps only them.
    """
    if split not in SPLITS:
        raise PipelineError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if fraction == 0.0:
        return captions
    held = heldout_mask(captions["product_id"].to_numpy(), fraction, seed)
    keep = held if split == "validation" else ~held
    return captions[keep].reset_index(drop=True)
