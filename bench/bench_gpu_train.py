"""GPU benchmark of the one training loop at Kandinsky 2.1's real size: samples/s, memory, MFU, profile.

Usage (on a CUDA machine): python bench/bench_gpu_train.py [--batch-size 32] [--steps 40] [--only NAME ...]
                                                             [--curve-steps 200] [--out reports/gpu_train.json]
       python bench/bench_gpu_train.py --smoke      # the tiny models on the CPU: checks this script
Without a CUDA device (and without --smoke) it prints "skipped: no CUDA device" and exits 0 (`make bench`).

For the prior (1.0 B) and the U-Net (1.2 B, 256 px: 32x32 latents), built from 2.1's published
configs (``fashiondiff.models.published``) with random weights on the GPU, it trains with the
project's own loop (``fashiondiff.train.loop.train``: Accelerate, bf16 autocast, the settings a
stage gets from params.yaml) and the tasks' real losses, on random batches of the cache's exact
shapes. Each configuration reports:

- samples/s over the steps after the first ``--warmup`` (the loop's own logged rate, which the
  loop measures between its device synchronisations), and the peak GPU memory;
- FLOPs per sample counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device,
  forward and backward as the loss runs them (model FLOPs: gradient checkpointing's recomputation
  is counted apart, as ``recompute_flops_per_sample``), and MFU against the card's dense bf16
  peak, looked up from the device name (an unknown card: MFU null and the report says so);
- a ``torch.profiler`` summary of a few steps: the top kernels by GPU time and the share of the
  profiled stretch in which the GPU ran no kernel;
- the time of one checkpoint save and load at that size (``train.checkpoint_every``'s cost).

Configurations: ``eager`` (``train.compile: off``, how the loop ran before) and ``compiled``
(the loop's default on a GPU) for full fine-tuning, then full with gradient checkpointing (U-Net)
and LoRA rank 4 compiled. ``--curve-steps`` also trains each network eager and compiled for that
many steps on a small fixed set it can learn and reports the largest relative gap between their
logged loss curves (bf16 noise: the compiled loop must follow the eager one). Everything goes to
``--out`` as each configuration finishes, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from flops import FULL_SHAPES, TINY_SHAPES, count_flops, network, peak_flops, section_for  # noqa: E402

CONFIGS = (
    "prior:full:eager",
    "prior:full:compiled",
    "prior:lora4:compiled",
    "decoder:full:eager",
    "decoder:full:compiled",
    "decoder:full+checkpointing:compiled",
    "decoder:lora4:compiled",
)


TITLE_TOKENS = 12  # a FashionGen title: ~12 CLIP tokens


class RandomCache:
    """Random arrays of the cache's shapes, ``items`` distinct ones (a pure function of the index,
    so an item is the same whenever it comes back): what ``PriorTask``/``DecoderTask`` fetch."""

    def __init__(self, kind: str, n: int, shapes: dict, items: int | None = None):
        self.kind, self.n, self.shapes, self.items = kind, n, shapes[kind], items or n
        self.uncond = {k: np.zeros((1, *s), np.float32) for k, s in self.shapes.items()}
        self.uncond["text_mask"] = np.ones((1, 77), bool)

    def __len__(self) -> int:
        return self.n

    def fetch(self, index, names):
        out = {
            k: np.stack(
                [
                    np.random.default_rng(int(i) % self.items).standard_normal(self.shapes[k], dtype=np.float32)
                    for i in index
                ]
            )
            for k in names
        }
        if "text_mask" in out:
            out["text_mask"] = np.broadcast_to(np.arange(77) < TITLE_TOKENS, (len(index), 77)).copy()
        return out


def _loop_config(smoke: bool, compiled: bool, log_every: int, checkpoint_every: int):
    from fashiondiff.config.whole import load_params

    train = load_params(REPO / "params.yaml").train
    return train.model_copy(
        update=dict(
            mixed_precision="no" if smoke else "bf16",
            compile="on" if compiled else "off",
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            warmup_steps=0,
            ema_decay=0.0,
            checkpoints_keep=1,
        )
    )


def _task(kind: str, net, cache):
    from fashiondiff.standin.tiny import decoder_scheduler, prior_scheduler
    from fashiondiff.train.decoder import DecoderTask
    from fashiondiff.train.prior import PriorTask

    return (
        PriorTask(net, prior_scheduler(), cache, 0.1)
        if kind == "prior"
        else DecoderTask(net, decoder_scheduler(), cache, 0.5, 0.1)
    )


def measure(
    kind: str, mode: str, compiled: bool, batch: int, steps: int, warmup: int, smoke: bool, checkpoint_root: Path
) -> dict:
    """One configuration through the real loop: speed, memory, a profile, a checkpoint save and load."""
    from fashiondiff.train.loop import Schedule, train
    from fashiondiff.train.run import prepare

    device = "cpu" if smoke else "cuda"
    torch.manual_seed(0)
    net = network(kind, smoke, device)
    trainable = prepare(net, section_for(kind, mode), kind)
    if "checkpointing" in mode:
        net.enable_gradient_checkpointing()
    log_every = 5
    cfg = _loop_config(smoke, compiled, log_every, checkpoint_every=10 * steps)
    cache = RandomCache(kind, batch * steps, TINY_SHAPES if smoke else FULL_SHAPES, items=batch * 4)
    rates: dict[int, float] = {}
    profiled = max(warmup, steps - PROFILED - 1)  # the last steps are profiled, and left out of the rate
    profiler = _profiler(smoke, profiled)
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{kind}-", dir=checkpoint_root))
    with profiler:
        result = train(
            _task(kind, net, cache),
            cfg,
            Schedule(1, batch, 5e-4, 0),
            folder,
            f"bench-{kind}-{mode}",
            log=lambda metrics, step: rates.__setitem__(step, metrics["samples_per_s"]),
            on_step=lambda step: profiler.step(),
        )
    # the loop's rate between its synchronisations, averaged over the stretches after the warm-up
    # (compilation and autotuning happen in the first steps)
    timed = [step for step in sorted(rates) if warmup < step <= profiled]
    per_stretch = [rates[s] for s in timed]
    row = {
        "model": kind,
        "mode": mode,
        "compiled": compiled,
        "batch_size": batch,
        "steps": steps,
        "trainable_parameters": trainable,
        "parameters": sum(p.numel() for p in net.parameters()),
        "samples_per_s": round(float(np.mean(per_stretch)), 2) if per_stretch else None,
        "peak_gpu_memory_gib": None if smoke else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "checkpoint_save_s": round(result.checkpoint_s, 2),
    }
    started = time.perf_counter()  # the load: a second run resumes the finished one at its last step
    train(_task(kind, net, cache), cfg, Schedule(1, batch, 5e-4, 0), folder, f"bench-{kind}-{mode}")
    row["checkpoint_load_s"] = round(time.perf_counter() - started, 2)
    row["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    row["profile"] = _summary(profiler, smoke)
    _remove(folder)
    return row


PROFILED = 7  # steps under the profiler: 2 to warm it up, 5 recorded


def _profiler(smoke: bool, wait: int):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([] if smoke else [ProfilerActivity.CUDA])
    return profile(activities=activities, schedule=schedule(wait=wait, warmup=2, active=PROFILED - 2, repeat=1))


def _summary(prof, smoke: bool, top: int = 12) -> dict:
    """Top kernels by GPU time (top ops by CPU time in --smoke) and the GPU's idle share."""
    events = prof.key_averages()
    attr = "self_cpu_time_total" if smoke else "self_device_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    summary = {
        "top": [{"name": e.key[:120], "share": round(getattr(e, attr) / total, 4), "calls": e.count} for e in ranked]
    }
    if not smoke:
        kernels = [
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
        ]
        if kernels:
            kernels.sort()
            busy, (lo, hi) = 0.0, kernels[0]
            span = (kernels[0][0], max(end for _, end in kernels))
            for start, end in kernels[1:]:
                if start > hi:
                    busy, lo, hi = busy + (hi - lo), start, end
                else:
                    hi = max(hi, end)
            busy += hi - lo
            summary["gpu_idle_share"] = round(1 - busy / max(span[1] - span[0], 1e-9), 4)
    return summary


def loss_curves(kind: str, batch: int, steps: int, smoke: bool, checkpoint_root: Path) -> dict:
    """Eager and compiled loops on the same small learnable set: the largest relative gap between
    their logged loss points, and both curves' first and last points."""
    from fashiondiff.train.loop import Schedule, train
    from fashiondiff.train.run import prepare

    curves = {}
    items = batch * 10  # 10 steps an epoch: the network learns the set, the loss falls
    for compiled in (False, True):
        torch.manual_seed(0)
        net = network(kind, smoke, "cpu" if smoke else "cuda")
        prepare(net, section_for(kind, "full"), kind)
        cfg = _loop_config(smoke, compiled, log_every=10, checkpoint_every=10 * steps)
        cache = RandomCache(kind, items, TINY_SHAPES if smoke else FULL_SHAPES)
        folder = Path(tempfile.mkdtemp(prefix=f"curve-{kind}-", dir=checkpoint_root))
        result = train(_task(kind, net, cache), cfg, Schedule(steps // 10, batch, 1e-4, 0), folder, "curve")
        curves[compiled] = [p["loss"] for p in result.history]
        _remove(folder)
        del net
        gc.collect()
    gaps = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(curves[False], curves[True])]
    return {
        "model": kind,
        "steps": steps,
        "points": len(gaps),
        "max_relative_gap": round(max(gaps), 5),
        "eager": [round(curves[False][0], 5), round(curves[False][-1], 5)],
        "compiled": [round(curves[True][0], 5), round(curves[True][-1], 5)],
    }


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rate (compilation)")
    parser.add_argument("--only", nargs="*", default=None, help=f"configurations (of {', '.join(CONFIGS)})")
    parser.add_argument("--curve-steps", type=int, default=200, help="0: skip the loss-curve comparison")
    parser.add_argument(
        "--checkpoints",
        default=str(REPO / "build/bench-checkpoints"),
        help="where checkpoints are written (a real disk, not /dev/shm: their cost is measured)",
    )
    parser.add_argument("--out", default=str(REPO / "reports/gpu_train.json"))
    parser.add_argument("--smoke", action="store_true", help="the tiny models on the CPU: checks this script")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():  # `make bench` on a CPU machine: nothing to measure
        print("bench_gpu_train: skipped: no CUDA device (--smoke checks this script on the CPU)")
        return
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    peak = None if args.smoke else peak_flops(name)
    report = {
        "device": name,
        "torch": torch.__version__,
        "bf16_peak_flops": peak,
        "mfu_note": None if peak else f"unknown card {name!r}: no dense bf16 peak on file, MFU not computed",
        "results": [],
        "loss_curves": [],
    }
    root = Path(args.checkpoints)
    root.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(report, indent=2) + "\n")

    flops: dict[tuple[str, str], dict] = {}
    for config in args.only or CONFIGS:
        kind, mode, how = config.split(":")
        started = time.perf_counter()
        try:
            if (kind, mode) not in flops:
                flops[kind, mode] = count_flops(kind, mode, args.batch_size, args.smoke)
            row = measure(kind, mode, how == "compiled", args.batch_size, args.steps, args.warmup, args.smoke, root)
            row.update(flops[kind, mode])
            sps = row["samples_per_s"]
            row["mfu"] = round(row["train_flops_per_sample"] * sps / peak, 4) if peak and sps else None
        except torch.cuda.OutOfMemoryError as exc:
            row = {
                "model": kind,
                "mode": mode,
                "compiled": how == "compiled",
                "batch_size": args.batch_size,
                "error": f"out of GPU memory: {str(exc).splitlines()[0]}",
            }
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
        report["results"].append(row)
        save()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for kind in ("prior", "decoder") if args.curve_steps else ():
        curve = loss_curves(kind, args.batch_size, args.curve_steps, args.smoke, root)
        print(json.dumps(curve), flush=True)
        report["loss_curves"].append(curve)
        save()


if __name__ == "__main__":
    main()
