"""Benchmark: the cost per training step of each loss and optimiser option (docs/training-options.md)
against the default step, same models, same batch, one process.

Usage: python bench/bench_options.py [--batch 32] [--repeats 30]

A step is what the loop does per optimiser step: the task's loss (with the option's Objective),
backward, AdamW, and the EMA update when the option keeps one. The options are timed
interleaved, one step each per round, so machine noise falls on all of them alike; the table
gives each option's median step over the default's median from the same rounds. The models
are the embedded tiny ones (bench/bench_train.py's setup): on the real 2.1 networks the
options' extra element-wise work is a smaller share of a step (not measured here; no GPU).
``adamw8bit`` is not measured: bitsandbytes' AdamW8bit runs on CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import setup

from fashiondiff.models.loader import load_decoder, load_prior
from fashiondiff.train.decoder import DecoderTask
from fashiondiff.train.draws import SampleDraws
from fashiondiff.train.loop import _make_ema
from fashiondiff.train.objective import Objective
from fashiondiff.train.prior import PriorTask

OPTIONS = {  # name -> train.* settings (the ablation's, docs/results.md)
    "default": {},
    "min_snr_gamma 5": {"min_snr_gamma": 5.0},
    "noise_offset 0.05": {"noise_offset": 0.05},
    "input_perturbation 0.1": {"input_perturbation": 0.1},
    "huber 0.1": {"loss": "huber", "huber_delta": 0.1},
    "ema 0.99": {"ema_decay": 0.99},
    "ema 0.99 on cpu": {"ema_decay": 0.99, "ema_device": "cpu"},
    "ema 0.9 every 10": {"ema_decay": 0.9, "ema_every": 10},
}
LOSS_DEFAULTS = {
    "min_snr_gamma": 0.0,
    "noise_offset": 0.0,
    "input_perturbation": 0.0,
    "loss": "mse",
    "huber_delta": 1.0,
}


class Settings:  # what Objective.from_params reads of params.train
    def __init__(self, **kw):
        self.__dict__.update({**LOSS_DEFAULTS, **{k: v for k, v in kw.items() if k in LOSS_DEFAULTS}})


def stepper(make_task, net: torch.nn.Module, scheduler, options: dict, batch: dict, items: np.ndarray):
    """One optimiser step with ``options`` on its own copy of the network's trainable state."""
    task = make_task(Objective.from_params(Settings(**options), scheduler))
    trainable = [p for p in net.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    ema = _make_ema(trainable, options.get("ema_decay", 0.0), options.get("ema_device", "auto"))
    every, count = options.get("ema_every", 1), [0]

    def step(i: int) -> None:
        with torch.no_grad():  # every option starts each step from the same weights
            for p, s in zip(trainable, start):
                p.copy_(s)
        loss = task.loss(net, batch, SampleDraws(0, i, items, "cpu"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        count[0] += 1
        if ema is not None and count[0] % every == 0:
            ema.step(trainable)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the stages run on a CPU
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, _, cache = setup(root, n_products=max(8, args.batch // 2))
        items = np.arange(args.batch)
        prior = load_prior(str(root / "base/prior"))
        decoder = load_decoder(str(root / "base/decoder"))
        models = {
            "prior": (lambda o: PriorTask(prior.prior, prior.scheduler, cache, 0.1, o), prior.prior, prior.scheduler),
            "decoder": (
                lambda o: DecoderTask(decoder.unet, decoder.scheduler, cache, 0.5, 0.1, o),
                decoder.unet,
                decoder.scheduler,
            ),
        }
        print(
            f"batch {args.batch}, {args.repeats} interleaved rounds, torch threads {torch.get_num_threads()}; "
            f"median step, ratio to the default's median (the rounds' ratios, quartiles)"
        )
        for name, (make_task, net, scheduler) in models.items():
            batch = make_task(None).batch(items, torch.device("cpu"))
            steps = {o: stepper(make_task, net, scheduler, settings, batch, items) for o, settings in OPTIONS.items()}
            times: dict[str, list[float]] = {o: [] for o in OPTIONS}
            for i in range(args.repeats + 2):
                for option, step in steps.items():
                    started = time.perf_counter()
                    step(i)
                    if i >= 2:  # warm-up
                        times[option].append(time.perf_counter() - started)
            reference = statistics.median(times["default"])
            for option, ts in times.items():
                m = statistics.median(ts)
                # each round's ratio to the default's step of the same round: the noise
                q1, _, q3 = statistics.quantiles([t / d for t, d in zip(ts, times["default"])], n=4)
                print(f"{name:8s} {option:24s} {1000 * m:7.1f} ms  x{m / reference:.2f}  (rounds: {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    sys.exit(main())
