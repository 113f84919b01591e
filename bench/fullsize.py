"""Full-size dry run: Kandinsky 2.1 at its published size (random weights) through every real stage.

Usage:
    python bench/fullsize.py                      # `make fullsize`: CPU, float16 cache, trainable subsets
    python bench/fullsize.py --device cuda --batch-size 32 --bf16 --steps 500 --prompts 4   # on a GPU:
                                                  # reports/fullsize_gpu.json (bench/gpu_session.sh)
    python bench/fullsize.py --tiny               # the same code path on the tiny model (the test)

In a scratch folder (--work, default build/fullsize) with its own params.yaml it
1. writes FashionGen-layout HDF5 files (synthetic: a few dozen rows, 4 poses per product; and a
   held-out generic-domain file),
2. saves 2.1's networks at published sizes with random weights as diffusers folders laid out
   like kandinsky-community/kandinsky-2-1-prior and kandinsky-2-1 (fashiondiff.standin.fullsize),
3. runs the REAL stage entry points, each in its own process: stages/extract.py (train,
   validation, generic) -> stages/embed.py (float16) -> stages/train_prior.py, stages/train_decoder.py
   (a few steps) -> stages/evaluate.py (a few prompts and sampling steps) -> `fashiondiff
   generate` text->image and image+text->image,
4. writes reports/fullsize.json (--report; reports/fullsize_gpu.json with --device cuda): per
   stage seconds and peak RSS (peak GPU memory on a GPU), embed's images/s, each training's
   samples/s, evaluate's images/s (at --steps decoder steps, params evaluate.batch_size), per
   model trainable parameters and optimiser-state bytes (AdamW: two float32 moments per
   trainable parameter), the cache's bytes per image and (on a GPU) FLOPs per sample counted
   on the meta device (bench/flops.py) and MFU.

On a 24 GiB CPU machine the U-Net (1.2 B parameters: 16 bytes each for weights, gradients and
AdamW = 18 GiB before activations) and the prior (1.0 B) cannot be fully fine-tuned: the
default --trainable cpu trains documented parameter-name prefixes (params prior.trainable /
decoder.trainable, recorded in the JSON); --trainable all is full fine-tuning (the GPU run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# What the CPU run trains (prefixes of parameter names): the last transformer block and output
# head of the prior, the last (highest-resolution) up block and output head of the U-Net.
CPU_TRAINABLE = {
    "prior": "transformer_blocks.19,norm_out,proj_to_clip_embeddings",
    "decoder": "up_blocks.3,conv_norm_out,conv_out",
}
TINY_TRAINABLE = {
    "prior": "transformer_blocks.1,norm_out,proj_to_clip_embeddings",
    "decoder": "up_blocks.1,conv_norm_out,conv_out",
}
EDIT_PROMPT = "black leather mini skirt"


def stage_child() -> None:
    """``fullsize.py --child OUT.json SCRIPT ARGS...``: run a stage in this process, then record
    its seconds, peak RSS (VmHWM) and peak GPU memory."""
    out, script, args = sys.argv[2], sys.argv[3], sys.argv[4:]
    started = time.perf_counter()
    code = 0
    sys.argv = [script, *args]
    try:
        if script == "-m":
            sys.argv = ["fashiondiff", *args[1:]]
            runpy.run_module(args[0], run_name="__main__")
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # The stage's own high-water mark: ru_maxrss from wait4 would include the parent's memory at
    # fork (Linux carries the old address space's peak over exec), i.e. the models built here.
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    record = {
        "seconds": round(time.perf_counter() - started, 2),
        "exit": code,
        "peak_rss_bytes": int(hwm.group(1)) * 1024 if hwm else None,
    }
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            record["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    except ImportError:
        pass
    Path(out).write_text(json.dumps(record))
    sys.exit(code)


def run(work: Path, name: str, cmd: list[str], env: dict, log) -> dict:
    """Run one stage in a child process; seconds, peak RSS (its main process), peak GPU memory, stdout."""
    record_file = work / f".{name}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(record_file), *cmd]
    print(f"fullsize: {name}: {' '.join(cmd)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        log.flush()
    proc.wait()
    record = {"peak_rss_bytes": 0}
    if record_file.is_file():
        record.update(json.loads(record_file.read_text()))
    record.update(seconds=round(time.perf_counter() - started, 2), exit=proc.returncode)
    print(
        f"fullsize: {name}: {record['seconds']:.0f} s, peak RSS {record['peak_rss_bytes'] / 2**30:.2f} GiB"
        + (f", peak GPU {record['peak_gpu_bytes'] / 2**30:.2f} GiB" if "peak_gpu_bytes" in record else ""),
        flush=True,
    )
    if proc.returncode != 0:
        tail = "".join(lines[-15:])
        raise SystemExit(f"fullsize: {name} failed ({proc.returncode}):\n{tail}")
    record["_stdout"] = "".join(lines)
    return record


def samples_per_s(stdout: str, batch_size: int, kind: str = r"\w+") -> float | None:
    """Training throughput from the loop's last progress-bar rate (the stage's own summary
    line rounds to whole samples/s, 0 for a full-size step on a CPU)."""
    rates = re.findall(rf"train {kind}: [^\n\r]*?([\d.]+)(s/step|step/s)", stdout)
    if not rates:
        return None
    value, unit = rates[-1]
    steps_per_s = float(value) if unit == "step/s" else 1.0 / float(value)
    return round(steps_per_s * batch_size, 4)


def rate(stdout: str, pattern: str) -> float | None:
    """The last number ``pattern``'s group catches in a stage's output."""
    found = re.findall(pattern, stdout)
    return float(found[-1]) if found else None


def tqdm_rate(stdout: str, desc: str, unit: str) -> float | None:
    """Items per second from a progress bar's last rate (tqdm prints ``x unit/s`` or ``x s/unit``)."""
    rates = re.findall(rf"{re.escape(desc)}: [^\n\r]*?([\d.]+)(s/{unit}|{unit}/s)", stdout)
    if not rates:
        return None
    value, kind = rates[-1]
    return round(float(value) if kind.endswith("/s") else 1.0 / float(value), 4)


def scratch_params(work: Path, args, trainable: dict) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    res, clip = (64, 64) if args.tiny else (256, 224)
    params.update(epochs=1, batch_size=args.batch_size, clip_image_size=clip, diffusion_steps=args.steps, seed=0)
    params["data"]["files"] = {
        "train": str(work / "data/fashiongen_train.h5"),
        "validation": str(work / "data/fashiongen_validation.h5"),
        "generic": str(work / "data/generic_validation.h5"),
    }
    params["data"]["workers"] = 1
    params["model"].update(prior=str(work / "base/prior"), decoder=str(work / "base/decoder"), resolution=res)
    params["embed"].update(batch_size=min(args.batch_size, 8), dtype="float16")
    params["train"].update(
        mixed_precision="bf16" if args.bf16 else "no", warmup_steps=1, log_every=1, checkpoint_every=10_000
    )
    params["prior"]["trainable"] = trainable["prior"]
    params["decoder"]["trainable"] = trainable["decoder"]
    params["decoder"]["gradient_checkpointing"] = bool(args.gradient_checkpointing)
    params["evaluate"].update(
        num_prompts=args.prompts,
        prior_steps=args.prior_steps,
        batch_size=min(args.prompts, params["evaluate"]["batch_size"]),
        fid_weights="",
        workers=1,
    )  # full size: one model in memory at a time
    return params


def build_models(work: Path, args, captions: list[str]) -> dict:
    base = work / "base"
    if base.exists():
        shutil.rmtree(base)
    if args.tiny:
        from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

        save_pipelines(build_tiny(captions, TinySpec(clip_image_size=64, clip_patch_size=16)), base)
        return {}
    from fashiondiff.standin.fullsize import save_full_pipelines

    return save_full_pipelines(captions, base)


def trained_counts(folder: Path, component: str, spec: str) -> dict:
    """Parameters of the saved network, those the spec trains, and AdamW's state for them."""
    from fashiondiff.models.loader import load_component
    from fashiondiff.train.run import set_trainable

    net = load_component(str(folder), component, "model")
    trainable = set_trainable(net, spec, "trainable")
    total = sum(p.numel() for p in net.parameters())
    return {
        "parameters": total,
        "trainable_parameters": trainable,
        "trainable_spec": spec,
        "optimizer_state_bytes": 8 * trainable,  # AdamW exp_avg + exp_avg_sq, float32
        "full_finetune_bytes_before_activations": 16 * total,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return stage_child()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model (the test of this script)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="train.mixed_precision bf16 (GPU)")
    parser.add_argument(
        "--trainable",
        default=None,
        choices=("cpu", "all"),
        help="cpu: the documented subsets (default on cpu); all: full fine-tuning (default on cuda)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--products", type=int, default=6, help="train products (x4 poses); validation: half")
    parser.add_argument("--prompts", type=int, default=2, help="evaluate.num_prompts")
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="decoder sampling steps (diffusion_steps; x the weakest evaluate.edit_strengths >= 1)",
    )
    parser.add_argument("--prior-steps", type=int, default=2)
    parser.add_argument("--work", default=str(REPO / "build/fullsize"), help="scratch folder (replaced)")
    parser.add_argument(
        "--report", default=None, help="default reports/fullsize.json, reports/fullsize_gpu.json with --device cuda"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (models: ~26 GB at full size)")
    args = parser.parse_args()
    args.report = args.report or str(
        REPO / ("reports/fullsize_gpu.json" if args.device == "cuda" else "reports/fullsize.json")
    )
    trainable_mode = args.trainable or ("all" if args.device == "cuda" else "cpu")
    trainable = (
        {"prior": "all", "decoder": "all"}
        if trainable_mode == "all"
        else TINY_TRAINABLE
        if args.tiny
        else CPU_TRAINABLE
    )

    work = Path(args.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "bench"))
    from fashiondiff.processes import project_env
    from fashiondiff.standin.synthetic import GENERIC, write_synthetic

    # keep what PYTHONPATH already holds (on a GPU machine: the carried wheels, bench/gpu_session.sh)
    env = project_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
        FASHIONDIFF_TRACKING="off",
        **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}),
    )

    started = time.perf_counter()
    report: dict = {
        "mode": "tiny" if args.tiny else "full size, random weights",
        "device": args.device,
        "batch_size": args.batch_size,
        "mixed_precision": "bf16" if args.bf16 else "no",
        "embed_dtype": "float16",
        "trainable_mode": trainable_mode,
        "stages": {},
    }
    h5 = {
        "train": write_synthetic(work / "data/fashiongen_train.h5", args.products, 4, seed=0),
        "validation": write_synthetic(
            work / "data/fashiongen_validation.h5", max(2, args.products // 2), 4, seed=1, first_product_id=200_000
        ),
        "generic": write_synthetic(
            work / "data/generic_validation.h5",
            max(2, args.products // 2),
            2,
            seed=2,
            first_product_id=300_000,
            domain=GENERIC,
        ),
    }
    import h5py

    captions = []
    for path in h5.values():
        with h5py.File(path) as f:
            captions += [bytes(b).decode("latin-1").strip("\x00 ") for b in f["input_name"][:, 0]]
    t = time.perf_counter()
    counts = build_models(work, args, captions)
    report["build_models_seconds"] = round(time.perf_counter() - t, 1)
    report["base_parameters"] = counts
    params = scratch_params(work, args, trainable)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    stages = REPO / "stages"
    with open(work / "fullsize.log", "w") as log:

        def stage(name, *cmd):
            rec = run(work, name, [str(c) for c in cmd], env, log)
            report["stages"][name] = {k: v for k, v in rec.items() if not k.startswith("_")}
            return rec

        for split in ("train", "validation", "generic"):
            stage(f"extract@{split}", stages / "extract.py", h5[split], f"data/extracted/{split}")
        for split in ("train", "validation"):
            rec = stage(f"embed@{split}", stages / "embed.py", f"data/extracted/{split}", split, f"data/cache/{split}")
            report["stages"][f"embed@{split}"]["images_per_s"] = rate(rec["_stdout"], r"embed: .*?([\d.]+) images/s")
        for kind in ("prior", "decoder"):
            rec = stage(
                f"train_{kind}",
                stages / f"train_{kind}.py",
                "--cache",
                "data/cache/train",
                "--val-cache",
                "data/cache/validation",
                "--out",
                f"models/{kind}",
                "--checkpoints",
                f"checkpoints/{kind}",
                "--summary",
                f"reports/train_{kind}.json",
                "--plot",
                f"reports/plots/train_{kind}.csv",
            )
            report["stages"][f"train_{kind}"]["samples_per_s"] = samples_per_s(rec["_stdout"], args.batch_size)
            report["stages"][f"train_{kind}"]["metrics"] = json.loads((work / f"reports/train_{kind}.json").read_text())
        rec = stage(
            "evaluate",
            stages / "evaluate.py",
            "--catalogue",
            "data/extracted/validation",
            "--generic",
            "data/extracted/generic",
            "--tuned",
            "models",
            "--reports",
            "reports",
        )
        report["stages"]["evaluate"].update(
            diffusion_steps=args.steps,
            batch_size=params["evaluate"]["batch_size"],
            images_per_s={m: tqdm_rate(rec["_stdout"], f"evaluate {m}", "image") for m in ("base", "tuned")},
        )
        stage(
            "generate text->image",
            "-m",
            "fashiondiff",
            "generate",
            EDIT_PROMPT,
            "--model",
            "models",
            "--out",
            "generated/text.png",
            "--device",
            args.device,
        )
        source = sorted((work / "data/extracted/validation").rglob("*.png"))[0]
        stage(
            "generate image+text->image",
            "-m",
            "fashiondiff",
            "generate",
            EDIT_PROMPT,
            "--model",
            "models",
            "--image",
            source,
            "--strength",
            "0.6",
            "--out",
            "generated/edit.png",
            "--device",
            args.device,
        )

    for out in ("generated/text.png", "generated/edit.png", "reports/metrics.json"):
        if not (work / out).is_file():
            raise SystemExit(f"fullsize: {out} was not written")
    meta = json.loads((work / "data/cache/train/meta.json").read_text())
    size = sum(f.stat().st_size for f in (work / "data/cache/train").iterdir())
    report["cache"] = {
        "images": meta["items"],
        "unique_captions": meta["captions"],
        "bytes": size,
        "bytes_per_image": round(size / meta["items"], 1),
        "dtype": meta["dtype"],
        "latents_shape": meta["arrays"]["latents"]["shape"],
    }
    res = params["model"]["resolution"]
    report["models"] = {}
    for kind, component in (("prior", "prior"), ("decoder", "unet")):
        info = trained_counts(work / "models" / kind, component, trainable[kind])
        sps = report["stages"][f"train_{kind}"]["samples_per_s"]
        if args.device == "cuda" and trainable_mode == "all" and res == 256:  # 2.1's shapes: count them
            import torch
            from flops import count_flops, peak_flops

            flops = count_flops(kind, "full", args.batch_size, smoke=False)["train_flops_per_sample"]
            name = torch.cuda.get_device_name()
            peak = peak_flops(name)
            info.update(
                train_flops_per_sample=flops,
                device_name=name,
                bf16_peak_flops=peak,
                mfu=(flops * sps / peak) if (peak and sps) else None,
            )
        report["models"][kind] = info
    report["evaluate_metrics"] = json.loads((work / "reports/metrics.json").read_text())
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["peak_rss_bytes_max"] = max(s["peak_rss_bytes"] for s in report["stages"].values())
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"fullsize: done in {report['total_seconds'] / 60:.1f} min, peak RSS "
        f"{report['peak_rss_bytes_max'] / 2**30:.2f} GiB, cache {report['cache']['bytes_per_image'] / 1024:.1f} "
        f"KiB/image -> {args.report}"
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
