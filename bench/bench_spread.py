"""Benchmark: embed and evaluate in one process and in several, and evaluate's memory against its prompt count.

Usage:
    python bench/bench_spread.py --project DIR [--steps 200]    # CPU: one process vs two (gloo)
    python bench/bench_spread.py --project DIR --rss            # evaluate at 200 and 2,000 prompts
    python bench/bench_spread.py --project DIR --train          # train_prior: one process vs two
    python bench/bench_spread.py --fullsize --processes 1 8     # GPUs: full size, images/s per GPU
    python bench/bench_spread.py --fullsize --tiny --processes 1 2 --steps 4   # its smoke test, CPU

DIR holds the embedded default's inputs and models (a `dvc repro` done: data/extracted/, models/).
Each run is the real stage started as dvc.yaml starts it (``python stages/...`` or ``accelerate
launch ... stages/...``), in a scratch folder under --work with its own params.yaml; the peak RSS
of every process of the run (VmHWM, polled every 0.2 s) is reported per process.

* default: embed (the train split) and evaluate (``--steps`` diffusion steps, default params
  otherwise) under ``python`` and under two gloo processes (ACCELERATE_USE_CPU=1); evaluate also
  with ``evaluate.workers`` 1 (one process) and 2 (the default: base and tuned in two processes).
  Rates leave the start-up out: embed's own images/s line, evaluate's sampling bars' time. Every
  output file of embed (the cache) and of evaluate (reports/) is compared byte for byte, one
  process against two (``embed_files``, ``evaluate_files``: how many, and which differ);
* ``--train``: train_prior with the project's params under ``python`` and under two gloo
  processes: optimiser steps, the largest gap between the loss curves and between the weights;
* ``--rss``: evaluate at ``evaluate.num_prompts`` 200 and 2,000, ``diffusion_steps`` 10 (issue 22:
  peak RSS within 20 %);
* ``--fullsize`` (CUDA): Kandinsky 2.1 at its published size with random weights
  (``fashiondiff.standin.fullsize``, 256 px), embed and evaluate on N = ``--processes`` GPUs:
  images/s per GPU, and the time of a 10,000-image FID of both models (2 x 10,000 samples at
  ``--steps``, default 500, with guidance) from the measured per-GPU rate.
Writes ``--out`` (JSON) and prints a table. Where it has nothing to measure (``--fullsize`` without
CUDA, the CPU figures without the project's `dvc repro` outputs) it says so in one line,
"skipped: ...", and exits 0: `make bench` runs it anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

import yaml

from fashiondiff.processes import accelerate_launch

REPO = Path(__file__).resolve().parents[1]


def _tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def _role(pid: int, script: str) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    except OSError:
        return None
    if "accelerate" in cmd and "launch" in cmd:
        return "launcher"
    if script in cmd:
        return f"process {int(env.get(b'RANK', b'0'))}" if b"RANK" in env else "process 0"
    return "worker"


def run(work: Path, name: str, params: dict, command: list[str], script: str, args: list, cpu: bool) -> dict:
    """One stage run: wall seconds, its output, and each process's peak RSS (bytes)."""
    cwd = work / name
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "FASHIONDIFF_TRACKING": "off",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    log = open(cwd / "log.txt", "w")
    print(f"bench_spread: {name}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(
        command + [str(REPO / "stages" / script), *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    peaks: dict[int, tuple[str, int]] = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            try:
                hwm = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
            except OSError:
                continue
            role = peaks.get(pid, (None,))[0] or _role(pid, script)
            if hwm and role:
                peaks[pid] = (role, max(int(hwm.group(1)) * 1024, peaks.get(pid, ("", 0))[1]))
        time.sleep(0.2)
    seconds = time.perf_counter() - started
    log.close()
    text = (cwd / "log.txt").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"bench_spread: {name} failed ({proc.returncode}):\n{text[-3000:]}")
    by_role: dict[str, int] = {}
    for role, peak in peaks.values():
        by_role[role] = max(by_role.get(role, 0), peak)
    return {"seconds": round(seconds, 1), "peak_rss_bytes": by_role, "log": text}


def base_params(project: Path) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for key in ("prior", "decoder"):
        params["model"][key] = str(project / params["model"][key])
    return params


def evaluate_args(project: Path, reports: str = "reports") -> list:
    return [
        "--catalogue",
        project / "data/extracted/validation",
        "--generic",
        project / "data/extracted/generic",
        "--tuned",
        project / "models",
        "--reports",
        reports,
    ]


def sampling_seconds(log: str) -> float:
    """How long the sampling bars ran (the longest, when workers sample side by side): tqdm's
    elapsed time at 100 %, without the start-up, model loading and real-image statistics."""

    def seconds(stamp: str) -> float:
        parts = [float(p) for p in stamp.split(":")]
        return sum(v * 60**i for i, v in enumerate(reversed(parts)))

    done = re.findall(r"evaluate(?: base| tuned)?: 100%\|[^|]*\| (\d+)/\1 \[([\d:]+)<", log)
    return max(seconds(stamp) for _, stamp in done)


def images_of(params: dict) -> int:
    """Samples an evaluate run generates: per model, each domain's prompts, and the edit."""
    return 2 * (2 * params["evaluate"]["num_prompts"] + 1)


def same_files(a: Path, b: Path) -> dict:
    """Every file under ``a`` and ``b`` compared byte for byte: how many, and which differ."""
    names = sorted({p.relative_to(root) for root in (a, b) for p in root.rglob("*") if p.is_file()})
    differ = [
        str(n)
        for n in names
        if not ((a / n).is_file() and (b / n).is_file()) or (a / n).read_bytes() != (b / n).read_bytes()
    ]
    return {"files": len(names), "differ": differ}


def cpu_figures(args) -> dict:
    project, work = args.project.resolve(), args.work.resolve()
    params = base_params(project)
    out = {"embed": {}, "evaluate": {}}
    for n in (1, 2):
        rec = run(
            work,
            f"embed-{n}",
            params,
            accelerate_launch(n),
            "embed.py",
            [project / "data/extracted/train", "train", "cache"],
            cpu=True,
        )
        rate = float(re.findall(r"([\d.]+) images/s", rec.pop("log"))[-1])
        out["embed"][f"{n} process{'es' if n > 1 else ''}"] = {**rec, "images_per_s": rate}
    ev = {**params, "diffusion_steps": args.steps}
    configs = {"1 process": (1, 1), "1 process + 2 sampling workers (default)": (1, 2), "2 processes": (2, 2)}
    for label, (n, workers) in configs.items():
        p = {**ev, "evaluate": {**ev["evaluate"], "workers": workers}}
        rec = run(
            work, f"evaluate-{n}-{workers}", p, accelerate_launch(n), "evaluate.py", evaluate_args(project), cpu=True
        )
        sampling = sampling_seconds(rec.pop("log"))
        out["evaluate"][label] = {
            **rec,
            "sampling_seconds": sampling,
            "images_per_s": round(images_of(p) / sampling, 3),
        }
    out["evaluate_metrics_identical"] = (work / "evaluate-1-1/reports/metrics.json").read_bytes() == (
        work / "evaluate-2-2/reports/metrics.json"
    ).read_bytes()
    # issue 30's check: every output file of the stage, one process against two
    out["embed_files"] = same_files(work / "embed-1/cache", work / "embed-2/cache")
    out["evaluate_files"] = same_files(work / "evaluate-1-1/reports", work / "evaluate-2-2/reports")
    out["settings"] = {
        "diffusion_steps": args.steps,
        "embed_images": "data/extracted/train",
        "evaluate_images": images_of(ev),
    }
    return out


def train_figures(args) -> dict:
    """train_prior as dvc.yaml starts it, one process against two, the project's params (its
    ``batch_size`` is the global batch): the optimiser steps, the largest gap between the two
    loss curves and between the two trained networks' weights (issue 30's check)."""
    from safetensors.numpy import load_file

    project, work = args.project.resolve(), args.work.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    cache = project / "data/cache"
    out: dict = {"batch_size": params["batch_size"]}
    for n in (1, 2):
        # the cache names the base models by params' relative paths: the same paths here
        for key in ("prior", "decoder"):
            link = work / f"train-{n}" / params["model"][key]
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(project / params["model"][key])
        stage_args = ["--cache", cache / "train", "--out", "prior"]
        stage_args += ["--checkpoints", "checkpoints", "--summary", "prior.json", "--plot", "curve.csv"]
        rec = run(work, f"train-{n}", params, accelerate_launch(n), "train_prior.py", stage_args, cpu=True)
        rec.pop("log")
        summary = json.loads((work / f"train-{n}/prior.json").read_text())
        out[f"{n} process{'es' if n > 1 else ''}"] = {**rec, "steps": summary["steps"]}
    curves = []
    for n in (1, 2):
        rows = (work / f"train-{n}/curve.csv").read_text().splitlines()[1:]
        curves.append([float(row.split(",")[2]) for row in rows])
    out["curve_points"] = len(curves[0])
    out["curve_gap"] = max(abs(a - b) for a, b in zip(*curves)) if len(curves[0]) == len(curves[1]) else None
    weights = "prior/prior/diffusion_pytorch_model.safetensors"
    one, two = (load_file(str(work / f"train-{n}/{weights}")) for n in (1, 2))
    out["weight_gap"] = max(float(abs(one[k].astype("float64") - two[k]).max()) for k in one)
    out["weights_identical"] = (work / f"train-1/{weights}").read_bytes() == (work / f"train-2/{weights}").read_bytes()
    return out


def rss_figures(args) -> dict:
    project, work = args.project.resolve(), args.work.resolve()
    params = base_params(project)
    out = {}
    for prompts in (200, 2000):
        p = {**params, "diffusion_steps": 10, "evaluate": {**params["evaluate"], "num_prompts": prompts}}
        rec = run(work, f"rss-{prompts}", p, accelerate_launch(1), "evaluate.py", evaluate_args(project), cpu=True)
        rec.pop("log")
        out[f"{prompts} prompts"] = {**rec, "images": images_of(p)}
    a, b = (max(out[k]["peak_rss_bytes"].values()) for k in ("200 prompts", "2000 prompts"))
    out["peak_ratio_2000_vs_200"] = round(b / a, 4)
    return out


def save_models(captions: list[str], base: Path, tiny: bool) -> tuple[int, int]:
    """2.1's networks at full size (random weights), or the tiny ones, unless ``base`` has them
    already; (resolution, CLIP image size)."""
    sizes = (64, 64) if tiny else (256, 224)
    if (base / "decoder").is_dir():
        return sizes
    if tiny:
        from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

        save_pipelines(build_tiny(captions, TinySpec(clip_image_size=64, clip_patch_size=16)), base)
    else:
        from fashiondiff.standin.fullsize import save_full_pipelines

        save_full_pipelines(captions, base)
    return sizes


def fullsize_figures(args) -> dict:
    """GPU: full-size networks (random weights), synthetic FashionGen-layout data, real stages."""
    import pandas as pd
    import torch

    from fashiondiff.data.extract import extract
    from fashiondiff.standin.synthetic import write_synthetic

    work = args.work.resolve()
    data = work / "data"
    if not (data / "train" / "captions.parquet").is_file():
        for name, products in (("train", args.products), ("validation", 16), ("generic", 16)):
            h5 = write_synthetic(data / f"{name}.h5", n_products=products, poses_per_product=4, seed=len(name))
            extract(h5, data / name, "{name}", 256, 2)
    captions = pd.read_parquet(data / "train" / "captions.parquet")["caption"].tolist()
    resolution, clip_size = save_models(captions, work / "base", args.tiny)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(clip_image_size=clip_size, diffusion_steps=args.steps)
    params["model"].update(prior=str(work / "base/prior"), decoder=str(work / "base/decoder"), resolution=resolution)
    params["embed"].update(batch_size=64, dtype="float16")
    params["evaluate"].update(num_prompts=args.prompts, batch_size=args.batch_size, workers=1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    out = {
        "gpu": gpu,
        "models": "tiny" if args.tiny else "Kandinsky 2.1 full size, random weights",
        "steps": args.steps,
        "embed": {},
        "evaluate": {},
    }
    for n in args.processes:
        rec = run(
            work,
            f"embed-{n}",
            params,
            accelerate_launch(n),
            "embed.py",
            [data / "train", "train", "cache"],
            cpu=args.tiny,
        )
        rate = float(re.findall(r"([\d.]+) images/s", rec.pop("log"))[-1])
        out["embed"][n] = {**rec, "images_per_s": rate, "images_per_s_per_gpu": round(rate / n, 2)}
        rec = run(
            work,
            f"evaluate-{n}",
            params,
            accelerate_launch(n),
            "evaluate.py",
            [
                "--catalogue",
                data / "validation",
                "--generic",
                data / "generic",
                "--tuned",
                work / "base",
                "--reports",
                "reports",
            ],
            cpu=args.tiny,
        )
        sampling = sampling_seconds(rec.pop("log"))
        rate = images_of(params) / sampling
        out["evaluate"][n] = {
            **rec,
            "sampling_seconds": sampling,
            "images_per_s": round(rate, 3),
            "images_per_s_per_gpu": round(rate / n, 3),
            "fid_10k_both_models_hours": round(2 * 10_000 / rate / 3600, 2),
        }
    return out


# What the CPU figures read from --project: `dvc repro`'s outputs (the base models: params' model.*).
PROJECT_OUTPUTS = (
    "data/extracted/train",
    "data/extracted/validation",
    "data/extracted/generic",
    "models/prior",
    "models/decoder",
)


def why_skipped(args) -> str:
    """Why this run cannot measure anything here ("" if it can): --fullsize needs CUDA (but with
    --tiny), the CPU figures the project's `dvc repro` outputs."""
    if args.fullsize:
        import torch

        return "" if args.tiny or torch.cuda.is_available() else "no CUDA device (--fullsize --tiny runs on the CPU)"
    project = args.project.resolve()
    model = yaml.safe_load((project / "params.yaml").read_text())["model"]
    needed = (*PROJECT_OUTPUTS, model["prior"], model["decoder"], *(["data/cache/train"] if args.train else []))
    missing = [p for p in needed if not (project / p).is_dir()]
    return f"no `dvc repro` outputs in {project} ({', '.join(missing)}): `make repro` first" if missing else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=REPO, help="the embedded default, `dvc repro` done")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_spread")
    parser.add_argument("--steps", type=int, default=None, help="diffusion_steps (CPU 200, full size 500)")
    parser.add_argument("--rss", action="store_true", help="evaluate's peak RSS at 200 and 2,000 prompts")
    parser.add_argument("--train", action="store_true", help="train_prior in one process and two: steps, gaps")
    parser.add_argument("--fullsize", action="store_true", help="full-size networks on GPUs")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 8], help="--fullsize: GPUs per run")
    parser.add_argument("--products", type=int, default=256, help="--fullsize: train products (x 4 poses)")
    parser.add_argument("--prompts", type=int, default=64, help="--fullsize: evaluate.num_prompts")
    parser.add_argument("--batch-size", type=int, default=16, help="--fullsize: evaluate.batch_size")
    parser.add_argument("--tiny", action="store_true", help="--fullsize with the tiny models (a smoke test, CPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    skipped = why_skipped(args)
    if skipped:  # `make bench` on a CPU machine, or before `make repro`: nothing to measure
        print(f"bench_spread: skipped: {skipped}")
        return
    if args.fullsize:
        args.steps = args.steps or 500
        result = fullsize_figures(args)
    elif args.rss:
        result = rss_figures(args)
    elif args.train:
        result = train_figures(args)
    else:
        args.steps = args.steps or 200
        result = cpu_figures(args)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
