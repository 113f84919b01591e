"""GPU benchmark: full fine-tuning against LoRA at Kandinsky 2.1's real size, through the real loop.

Usage (on a CUDA machine): python bench/bench_gpu_train.py [--batch-size 32] [--steps 30] [--out FILE]

For the prior (1.0 B) and the U-Net (1.2 B, 256 px: 32x32 latents), built from 2.1's
published configs with random weights directly on the GPU, it trains with the project's
own loop (``fashiondiff.train.loop.train``: Accelerate, bf16 autocast, AdamW, clipping,
the final checkpoint) and the tasks' real losses, on random batches of the cache's exact
shapes (what the loop reads is already in memory in a real run too: the data fetch is
0.1-2 % of a step). Each configuration -- full fine-tuning, full with gradient
checkpointing (U-Net), LoRA rank 4 on params.yaml's targets -- reports samples/s over the
steps after the first 10 and the peak GPU memory. A configuration that does not fit says so.
"""

from __future__ import annotations

import argparse
import dataclasses
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

def shapes(embed: int, mclip: int, latent: int) -> dict:
    """Per-item shapes of the cache: CLIP embedding width, M-CLIP width, latent side."""
    return {"prior": {"image_embeds": (embed,), "text_embeds": (embed,), "text_hidden": (77, embed),
                      "text_mask": (77,)},
            "decoder": {"latents": (4, latent, latent), "mclip_hidden": (77, mclip), "mclip_embeds": (embed,),
                        "image_embeds": (embed,)}}


FULL_SHAPES = shapes(768, 1024, 32)  # 2.1: CLIP ViT-L/14, XLM-R-large M-CLIP, 256 px
TINY_SHAPES = shapes(64, 48, 8)  # the embedded default's (--smoke, on the CPU)


class RandomCache:
    """Random arrays of the cache's shapes: what ``PriorTask``/``DecoderTask`` fetch."""

    def __init__(self, kind: str, n: int, shapes: dict):
        self.kind, self.n, self.shapes = kind, n, shapes[kind]
        self.uncond = {k: np.zeros((1, *s), np.float32) for k, s in self.shapes.items()}
        self.uncond["text_mask"] = np.ones((1, 77), bool)

    def __len__(self) -> int:
        return self.n

    def fetch(self, index, names):
        rng = np.random.default_rng(int(index[0]))
        out = {k: rng.standard_normal((len(index), *self.shapes[k]), dtype=np.float32) for k in names}
        if "text_mask" in out:
            out["text_mask"] = np.arange(77) < 12  # a FashionGen title: ~12 CLIP tokens
            out["text_mask"] = np.broadcast_to(out["text_mask"], (len(index), 77)).copy()
        return out


def build(kind: str, smoke: bool):
    """The network to train: 2.1's at full size on the GPU, or the tiny one (--smoke)."""
    if smoke:
        from fashiondiff.standin.tiny import build_tiny

        parts = build_tiny(["a b c"], seed=0)
        return parts.prior if kind == "prior" else parts.unet
    from diffusers import PriorTransformer, UNet2DConditionModel

    from fashiondiff.models.published import PRIOR as FULL_PRIOR
    from fashiondiff.models.published import UNET as FULL_UNET

    with torch.device("cuda"):
        if kind == "prior":
            net = PriorTransformer(**FULL_PRIOR)
            net.clip_std.data.fill_(1.0)  # a fresh prior's is 0
            return net
        return UNet2DConditionModel(**FULL_UNET)


def measure(kind: str, mode: str, batch: int, steps: int, smoke: bool = False) -> dict:
    from fashiondiff.config.schema import load_params
    from fashiondiff.standin.tiny import decoder_scheduler, prior_scheduler
    from fashiondiff.train.decoder import DecoderTask
    from fashiondiff.train.loop import Schedule, train
    from fashiondiff.train.prior import PriorTask
    from fashiondiff.train.run import prepare

    params = load_params(REPO / "params.yaml")
    torch.manual_seed(0)
    net = build(kind, smoke)
    section = getattr(params, kind)
    section = dataclasses.replace(section, lora_rank=4 if mode == "lora4" else 0)
    trainable = prepare(net, section, kind)
    if mode == "full+checkpointing":
        net.enable_gradient_checkpointing()
    cache = RandomCache(kind, batch * steps, TINY_SHAPES if smoke else FULL_SHAPES)
    task = (PriorTask(net, prior_scheduler(), cache, 0.1) if kind == "prior"
            else DecoderTask(net, decoder_scheduler(), cache, 0.5, 0.1))
    cfg = dataclasses.replace(params.train, mixed_precision="no" if smoke else "bf16", checkpoint_every=10 * steps,
                              log_every=10, warmup_steps=0, ema_decay=0.0)
    stamps: dict[int, float] = {}

    def log(metrics, step):
        if not smoke:
            torch.cuda.synchronize()
        stamps[step] = time.perf_counter()

    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as ckpt:
        train(task, cfg, Schedule(1, batch, 5e-4, 0), ckpt, f"bench-{kind}-{mode}", log=log)
    first, last = min(k for k in stamps if k >= 10), max(stamps)
    per_step = (stamps[last] - stamps[first]) / (last - first)
    return {"model": kind, "mode": mode, "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in net.parameters()), "batch_size": batch,
            "samples_per_s": round(batch / per_step, 2), "seconds_per_step": round(per_step, 4),
            "peak_gpu_memory_gib": None if smoke else round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="reports/gpu_train.json")
    parser.add_argument("--smoke", action="store_true", help="the tiny models on the CPU: checks this script")
    args = parser.parse_args()
    rows = []
    for kind, modes in (("prior", ("full", "lora4")), ("decoder", ("full", "full+checkpointing", "lora4"))):
        for mode in modes:
            started = time.perf_counter()
            try:
                row = measure(kind, mode, args.batch_size, args.steps, args.smoke)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"model": kind, "mode": mode, "batch_size": args.batch_size,
                       "error": f"out of GPU memory: {str(exc).splitlines()[0]}"}
            row["wall_seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
    device = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
