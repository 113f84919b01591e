"""How a process runs: its threads, its seeds, its device. Entry points call these first.

Usage, at the top of a stage's or a command's ``main``::

    limit_threads()
    seed_everything(params.seed)
    device = default_device()
"""

from __future__ import annotations

import os
import sys

# MKL (torch's CPU matrix products) in "conditional numerical reproducibility" mode: without it,
# some of its code paths round by where an operand lies in memory, and weights loaded as views
# into one file-sized buffer lie wherever that buffer landed, which depends on what the process
# allocated before. Measured: with MKL's SSE4.2 path forced (MKL_ENABLE_INSTRUCTIONS=SSE4_2, as
# an AMD EPYC's path differs from this Xeon's), 25 of 179 matrix-product shapes changed bits
# with the operands' offset, and embed's one-process and two-process caches differed in
# uncond_image_embeds/uncond_mclip_embeds; with AUTO, 0 of 179 and identical caches. On this
# Xeon's own (AVX-512) path AUTO changes no bit of any output. MKL reads it at its first call:
# entry points set it before any math (limit_threads), the project's subprocesses inherit it.
MKL_REPRODUCIBLE = {"MKL_CBWR": "AUTO"}


def limit_threads() -> None:
    """One intra-op thread per process unless OMP_NUM_THREADS says otherwise, and MKL in its
    reproducible mode (:data:`MKL_REPRODUCIBLE`).

    Measured here (2 cores): the tiny U-Net's training step took 0.3 s with one
    thread and 6 s with two once anything else ran beside it (OpenMP threads spin
    and fight). Our stages use the second core through processes instead
    (extract's pool, embed's image loader, `accelerate launch`).
    """
    for key, value in MKL_REPRODUCIBLE.items():
        os.environ.setdefault(key, value)
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def seed_everything(seed: int) -> None:
    """Seed every global RNG a stage may touch: Python's, NumPy's and torch's.

    Our own draws use explicit generators; this is for library code that reads the
    global ones, and for the RNG states Accelerate pickles into checkpoints (a DVC
    output: unseeded, they would differ run to run).
    """
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
