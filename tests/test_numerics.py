"""The CPU numerics every entry point sets up (fashiondiff.runtime.limit_threads): MKL's matrix
products give the same bits wherever their operands lie in memory.

Without MKL's reproducible mode, some of its code paths (an AMD EPYC's; on an Intel CPU the SSE4.2
path, forced here with MKL_ENABLE_INSTRUCTIONS) round by an operand's address, and a process's
allocation history decides the address of weights loaded as views into one file-sized buffer:
that is how `embed` under two processes wrote other bits than one process on an AMD EPYC."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fashiondiff.processes import project_env

# A linear layer over one row (a batch of one: the unconditional embeddings), its weight copied to
# each of 8 float offsets in a buffer: how many shapes give other bits at some offset.
PROBE = textwrap.dedent("""
    import sys
    import torch
    from fashiondiff.runtime import limit_threads
    if sys.argv[1] == "entry-point":
        limit_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    changed = 0
    for m, k, n in [(1, 64, 128), (1, 768, 768), (1, 512, 2048), (2, 256, 768), (4, 32, 64), (77, 64, 64)]:
        w, x = torch.randn(n, k), torch.randn(m, k)
        outs = []
        for offset in range(8):
            buffer = torch.empty(n * k + 8)
            weight = buffer[offset:offset + n * k].view(n, k)
            weight.copy_(w)
            outs.append(torch.nn.functional.linear(x, weight))
        changed += any(not torch.equal(outs[0], out) for out in outs[1:])
    print(changed)
""")


def shapes_that_change(mode: str) -> int:
    env = project_env(MKL_ENABLE_INSTRUCTIONS="SSE4_2")
    env.pop("MKL_CBWR")  # as a user's shell has it: unset
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.split()[-1])


def intel() -> bool:
    return "GenuineIntel" in Path("/proc/cpuinfo").read_text()


def test_matrix_products_do_not_depend_on_where_the_weights_lie():
    assert shapes_that_change("entry-point") == 0
    if intel():  # MKL honours MKL_ENABLE_INSTRUCTIONS on Intel CPUs: the probe can see the problem
        assert shapes_that_change("bare") > 0


def test_the_project_environment_asks_for_the_reproducible_mode(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    assert project_env()["MKL_CBWR"] == "AUTO"
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a user's own choice is kept
    assert project_env()["MKL_CBWR"] == "COMPATIBLE"
