"""Benchmark ``fashiondiff convert``: wall time and peak memory on product-shot JPEGs.

Usage: PYTHONPATH=src python bench/bench_convert.py [--images 2000] [--workers 2 0]

Makes ``--images`` 600 x 800 JPEGs (a textured garment of a random colour on white, 4 views
per product, quality 90: ~51 KB each) and their captions.csv in a temporary folder, then runs
``python -m fashiondiff convert`` once per ``--workers`` value under ``/usr/bin/time -v``.
Reports the wall time, the largest process's max RSS (what ``time -v`` measures), the load
average before each run (the machine may be shared), and whether the outputs are byte-identical.
The figures of docs/catalogue.md#measured come from this script.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fashiondiff.processes import project_env

WIDTH, HEIGHT, VIEWS = 600, 800, 4


def make_catalogue(folder: Path, n: int) -> Path:
    """``n`` JPEGs under ``folder/photos`` and ``folder/captions.csv``; returns the captions file."""
    rng = np.random.default_rng(0)
    texture = Image.effect_noise((WIDTH, HEIGHT), 40).convert("L").filter(ImageFilter.GaussianBlur(1))
    with open(folder / "captions.csv", "w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(["file", "caption", "category", "product_id"])
        for k in range(n):
            colour = [int(c) for c in rng.integers(0, 256, 3)]
            cloth = Image.merge(
                "RGB", [texture.point(lambda v, c=c: max(0, min(255, c + (v - 128) // 3))) for c in colour]
            )
            mask = Image.new("L", (WIDTH, HEIGHT), 0)
            x, y = int(rng.integers(60, 160)), int(rng.integers(60, 160))
            ImageDraw.Draw(mask).polygon([(x, y), (WIDTH - x, y), (560 - x // 2, 760), (x // 2 + 40, 760)], fill=255)
            photo = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
            photo.paste(cloth, (0, 0), mask)
            name = f"p{k // VIEWS:05d}/{k % VIEWS}.jpg"
            (folder / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
            photo.save(folder / "photos" / name, quality=90)
            rows.writerow([name, f"Garment {k // VIEWS} in {tuple(colour)}, view {k % VIEWS}", "TOPS", k // VIEWS])
    return folder / "captions.csv"


def timed(folder: Path, captions: Path, out: Path, workers: int) -> dict:
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "fashiondiff",
        "convert",
        "--images",
        str(folder / "photos"),
        "--captions",
        str(captions),
        "--out",
        str(out),
        "--workers",
        str(workers),
    ]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=project_env(), capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr).groups()
    seconds = int(wall[0] or 0) * 3600 + int(wall[1]) * 60 + float(wall[2])
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"workers": workers, "load": load, "seconds": seconds, "max_rss_mib": rss_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        folder = Path(tmp)
        captions = make_catalogue(folder, args.images)
        size = sum(p.stat().st_size for p in (folder / "photos").rglob("*.jpg"))
        print(f"{args.images} JPEGs of {WIDTH}x{HEIGHT}, {size / 1e6:.0f} MB; {os.cpu_count()} CPUs")
        outputs = [folder / f"out-{workers}.h5" for workers in args.workers]
        for workers, out in zip(args.workers, outputs):
            result = timed(folder, captions, out, workers)
            print(
                f"--workers {workers}: {result['seconds']:.1f} s, max RSS {result['max_rss_mib']:.0f} MiB "
                f"(load average before: {result['load']:.1f}); output {out.stat().st_size / 1e6:.0f} MB"
            )
        print("outputs byte-identical:", all(filecmp.cmp(outputs[0], out, shallow=False) for out in outputs))


if __name__ == "__main__":
    main()
