"""Benchmark extraction: our pooled ``extract`` against a plain single-process loop.

Usage: PYTHONPATH=src python bench/bench_extract.py [--images 10000] [--workers 2]

Makes (or reuses) bench/out/fashiongen_bench.h5, warms the page cache, then runs
each contender in its own subprocess (alternating, ``--repeat`` times, best kept)
and reports images/s, the speed-up, CPU time per image and peak RSS (ru_maxrss of
the main process and of its largest child, i.e. worker). Goals on 2 cores:
speed-up >= 1.8x, peak RSS <= 1 GB.

The PNGs go to ``--scratch`` (default: the system temp folder) and are deleted
after each run: file creation costs the same in both contenders but can dominate
on a slow or watched file system (about 1 ms per file under /work in our sandbox).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
POSES = 4


def make_input(n_images: int) -> Path:
    from fashiondiff.standin.synthetic import write_synthetic

    path = OUT / "fashiongen_bench.h5"
    if path.exists():
        with h5py.File(path, "r") as f:
            if f["input_image"].shape[0] >= n_images:
                return path
    began = time.perf_counter()
    write_synthetic(path, n_images // POSES, POSES, seed=1234)
    print(f"wrote {path} ({n_images} images) in {time.perf_counter() - began:.0f} s")
    return path


def warm_cache(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


def run_reference(path: Path, out: Path, chunk_size: int) -> int:
    """The obvious loop: read a chunk, save each picture with PIL, same PNG level."""
    from PIL import Image

    from fashiondiff.data.extract import PNG_LEVEL

    out.mkdir(parents=True)
    with h5py.File(path, "r") as f:
        images = f["input_image"]
        for start in range(0, images.shape[0], chunk_size):
            for i, picture in enumerate(images[start : start + chunk_size]):
                Image.fromarray(picture).save(out / f"{start + i:07d}.png", format="PNG", compress_level=PNG_LEVEL)
    return images.shape[0]


def run_extract(path: Path, out: Path, chunk_size: int, workers: int) -> int:
    from fashiondiff.data.extract import extract

    return extract(path, out, "{name}", chunk_size, workers)["rows"]


def child(kind: str, path: Path, chunk_size: int, workers: int, scratch: Path) -> None:
    """One contender in this process; print one JSON line with its figures."""
    out = scratch / f"fashiondiff-bench-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    if kind == "reference":
        n = run_reference(path, out, chunk_size)
    else:
        n = run_extract(path, out, chunk_size, workers)
    seconds = time.perf_counter() - began
    shutil.rmtree(out, ignore_errors=True)
    me, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime  # includes start-up
    print(
        json.dumps(
            {
                "kind": kind,
                "images": n,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "rss_main_mb": me.ru_maxrss / 1024,  # KiB on Linux
                "rss_worker_mb": kids.ru_maxrss / 1024,
            }
        )
    )


def contend(kind: str, path: Path, chunk_size: int, workers: int, scratch: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--chunk-size",
        str(chunk_size),
        "--workers",
        str(workers),
        "--input",
        str(path),
        "--scratch",
        str(scratch),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{kind} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each, best kept")
    parser.add_argument("--child", choices=("reference", "extract"))
    parser.add_argument("--input", type=Path)
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the PNGs are written (and deleted): a fast local disk",
    )
    args = parser.parse_args()
    if args.child:
        child(args.child, args.input, args.chunk_size, args.workers, args.scratch)
        return
    path = make_input(args.images)
    warm_cache(path)
    print(f"cpus: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
    best: dict[str, dict] = {}
    for _ in range(args.repeat):  # alternate, keep each one's best: the machine is shared
        for kind in ("reference", "extract"):
            r = contend(kind, path, args.chunk_size, args.workers, args.scratch)
            if kind not in best or r["seconds"] < best[kind]["seconds"]:
                best[kind] = r
    for kind, r in best.items():
        r["images_per_s"] = r["images"] / r["seconds"]
        label = "reference (1 process)" if kind == "reference" else f"extract ({args.workers} workers)"
        print(
            f"{label:22s} {r['images']} images {r['seconds']:6.1f} s "
            f"{r['images_per_s']:5.0f} img/s  cpu {1e3 * r['cpu_seconds'] / r['images']:.2f} "
            f"ms/img  peak RSS: main {r['rss_main_mb']:.0f} MB, "
            f"largest child {r['rss_worker_mb']:.0f} MB"
        )
    ratio = best["extract"]["images_per_s"] / best["reference"]["images_per_s"]
    cpu_ratio = best["reference"]["cpu_seconds"] / best["extract"]["cpu_seconds"]
    print(
        f"speed-up {ratio:.2f}x (goal >= 1.8x); CPU per image, reference/extract: "
        f"{cpu_ratio:.2f} (ceiling on {args.workers} free cores: {args.workers * cpu_ratio:.2f}x); "
        f"load average after: {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
