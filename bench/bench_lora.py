"""Benchmark: LoRA against full fine-tuning.

Usage: python bench/bench_lora.py [--epochs 10] [--skip-tiny]

1. Full size (Kandinsky 2.1's configs on the meta device, nothing allocated): trainable
   parameters and AdamW state (two fp32 moments, 8 bytes each) of the prior and the U-Net,
   fully and with LoRA of rank 4/16/64 on the targets params.yaml names.
2. Tiny models (the embedded default's sizes, this machine): each training stage run as
   a process, full and rank 4, for peak RSS, samples/s and the size of one checkpoint.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fashiondiff.processes import project_env

REPO = Path(__file__).resolve().parents[1]
RANKS = (4, 16, 64)
PARTS = {"prior": "prior", "decoder": "unet"}
# Stages start through this small process: a child forked straight from this benchmark
# (GBs after setup) would inherit its peak RSS, as Linux keeps ru_maxrss across exec.
RSS_WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def full_size_table() -> list[str]:
    from fashiondiff.config.whole import load_params
    from fashiondiff.models.published import build_full
    from fashiondiff.train.lora import add_lora

    params = load_params(REPO / "params.yaml")
    lines = ["| model | fine-tuning | trainable parameters | AdamW state |", "| --- | --- | --- | --- |"]
    for kind, part in PARTS.items():
        total = sum(p.numel() for p in build_full(meta=True)[part].parameters())
        lines.append(f"| {part} | full | {total / 1e6:.1f} M | {_gib(8 * total)} |")
        for rank in RANKS:
            section = getattr(params, kind).model_copy(update={"lora_rank": rank})
            count = add_lora(build_full(meta=True)[part], section, kind)  # meta: shapes only
            lines.append(
                f"| {part} | LoRA rank {rank} | {count / 1e6:.2f} M ({100 * count / total:.2f} %) | {_gib(8 * count)} |"
            )
    return lines


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def tiny_table(epochs: int) -> list[str]:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_train import (
        setup,  # the embedded default's tiny models and a 64-image cache
    )

    lines = [
        "| model | fine-tuning | peak RSS | samples/s | checkpoint | adapter |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup(root, n_products=16)
        for kind in PARTS:
            for rank in (0, 4):
                rss, speed, ckpt, adapter = run_stage(root, kind, rank, epochs)
                lines.append(
                    f"| {kind} | {'full' if rank == 0 else f'LoRA rank {rank}'} | {rss / 2**20:.0f} MiB "
                    f"| {speed:.0f} | {_size(ckpt)} | {_size(adapter) if rank else '-'} |"
                )
    return lines


def run_stage(root: Path, kind: str, rank: int, epochs: int) -> tuple[int, float, int, int]:
    work = root / f"{kind}-{rank}"
    work.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(epochs=epochs, clip_image_size=224)
    params["model"].update(prior=str(root / "base/prior"), decoder=str(root / "base/decoder"))
    params[kind]["lora_rank"] = rank
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        "-c",
        RSS_WRAPPER,
        sys.executable,
        str(REPO / f"stages/train_{kind}.py"),
        "--cache",
        str(root / "cache"),
        "--out",
        "out",
        "--checkpoints",
        "ckpt",
        "--summary",
        "m.json",
        "--plot",
        "p.csv",
    ]
    result = subprocess.run(
        cmd,
        cwd=work,
        env=project_env(FASHIONDIFF_TRACKING="off"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"train_{kind} rank {rank} failed:\n{result.stdout[-2000:]}")
    speed = float(re.search(r"([0-9.]+) samples/s", result.stdout).group(1))
    rss = int(re.search(r"peak_rss_kib (\d+)", result.stdout).group(1)) * 1024
    (checkpoint,) = (work / "ckpt").glob("*/step-*")  # ckpt/<run fingerprint>/ (fashiondiff.project)
    return rss, speed, _du(checkpoint), _du(work / "out/lora")


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    print("\n".join(full_size_table()))
    if not args.skip_tiny:
        print()
        print("\n".join(tiny_table(args.epochs)))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
