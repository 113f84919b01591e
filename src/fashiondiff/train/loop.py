"""One training loop (Accelerate) for the prior and the decoder.

A model plugs in through a :class:`Task`: the module to train, a way to fetch a
batch from the embedding cache, and a ``loss(model, batch, generator)``. The loop
owns everything else: data order, gradient accumulation and clipping, the LR
schedule, mixed precision, EMA, checkpoint/resume, NaN guard, logging.

Reproducibility: the data order of epoch ``e`` is a permutation seeded by
``(seed, e)`` and every random draw of step ``s`` on rank ``r`` comes from a
generator seeded by ``(seed, s, r)``. No global RNG is read, so a run resumed from
a checkpoint (model, optimiser, schedule and EMA restored by ``load_state``) ends
with the same weights, bit for bit on the CPU, as one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

from fashiondiff.errors import PipelineError


class Task(Protocol):
    name: str
    model: torch.nn.Module

    def __len__(self) -> int: ...

    def batch(self, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor: ...


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant_with_warmup"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    mixed_precision: str = "no"
    ema_decay: float = 0.0
    checkpoint_every: int = 200
    checkpoints_keep: int = 2
    log_every: int = 10


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped; EMA weights copied in when EMA is on
    history: list[dict] = field(default_factory=list)  # logged points: step, epoch, loss, lr
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    samples_per_s: float = 0.0
    data_share: float = 0.0  # fraction of step time spent fetching batches
    is_main: bool = True


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of every random draw in one step: a pure function of (seed, step, rank)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint64)
    g = torch.Generator(device=device)
    g.manual_seed(int(state[0] >> np.uint64(1)))
    return g


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def train(task: Task, cfg: LoopConfig, checkpoint_dir: str | Path, fingerprint: str,
          log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train ``task.model``; resume from ``checkpoint_dir`` if it holds a run with ``fingerprint``."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                      mixed_precision=cfg.mixed_precision)
    world, rank = acc.num_processes, acc.process_index
    n = len(task)
    per_rank = cfg.batch_size
    if n < per_rank * world:
        per_rank = max(1, n // world)
        acc.print(f"{task.name}: {n} items < batch_size x processes; using batch {per_rank} per process")
    steps_per_epoch = n // (per_rank * world)
    total = steps_per_epoch * cfg.epochs
    optimizer_steps = math.ceil(total / cfg.gradient_accumulation_steps)

    model = task.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise PipelineError(f"{task.name}: no trainable parameters (check {task.name}.trainable)")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    schedule = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=optimizer_steps)
    ema = _make_ema(model, cfg.ema_decay)
    model, optimizer = acc.prepare(model, optimizer)
    acc.register_for_checkpointing(schedule)
    if ema is not None:
        acc.register_for_checkpointing(ema)

    ckpts = Checkpoints(Path(checkpoint_dir), fingerprint, cfg.checkpoints_keep, acc)
    state = ckpts.resume()
    start = state.get("step", 0)
    history: list[dict] = state.get("history", [])
    epoch_sums: dict = {int(k): v for k, v in state.get("epoch_sums", {}).items()}
    acc.step = start  # Accelerate's micro-step counter decides when accumulated gradients sync
    if start:
        acc.print(f"{task.name}: resumed from step {start} of {total} ({ckpts.latest()})")

    bar = tqdm(total=total, initial=start, desc=f"train {task.name}", unit="step",
               disable=not acc.is_main_process, dynamic_ncols=True)
    window, fetch_s, step_s, seen = [], 0.0, 0.0, 0
    model.train()
    try:
        for step in range(start, total):
            epoch, k = divmod(step, steps_per_epoch)
            t0 = time.perf_counter()
            order = epoch_order(n, cfg.seed, epoch)
            lo = (k * world + rank) * per_rank
            batch = task.batch(np.sort(order[lo:lo + per_rank]), acc.device)
            t1 = time.perf_counter()
            with acc.accumulate(model):
                with acc.autocast():
                    loss = task.loss(model, batch, step_generator(cfg.seed, step, rank, acc.device))
                if not torch.isfinite(loss):
                    raise PipelineError(
                        f"train {task.name}: loss is {loss.item()} at step {step} (epoch {epoch}); "
                        f"stopped, last good checkpoint kept: {ckpts.latest() or 'none'}"
                    )
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.step(acc.unwrap_model(model).parameters())
            mean_loss = acc.gather(loss.detach().reshape(1)).mean().item()
            t2 = time.perf_counter()
            fetch_s, step_s, seen = fetch_s + (t1 - t0), step_s + (t2 - t0), seen + per_rank * world
            window.append(mean_loss)
            total_e, count_e = epoch_sums.get(epoch, (0.0, 0))
            epoch_sums[epoch] = (total_e + mean_loss, count_e + 1)
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                point = {"step": step + 1, "epoch": epoch, "loss": float(np.mean(window)),
                         "lr": schedule.get_last_lr()[0]}
                history.append(point)
                window = []
                speed = seen / max(step_s, 1e-9)
                bar.set_postfix(loss=f"{point['loss']:.4f}", samples_s=f"{speed:.0f}")
                if log is not None and acc.is_main_process:
                    log({"loss": point["loss"], "lr": point["lr"], "samples_per_s": speed}, step + 1)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                ckpts.save(step + 1, {"history": history, "epoch_sums": epoch_sums})
    finally:
        bar.close()
    acc.wait_for_everyone()
    final = acc.unwrap_model(model)
    if ema is not None:
        ema.copy_to(final.parameters())
    if world > 1:
        _check_ranks_agree(final, acc, task.name)
    ckpts.save(total, {"history": history, "epoch_sums": epoch_sums})
    epochs = [s / c for _, (s, c) in sorted(epoch_sums.items())]
    return TrainResult(model=final, history=history, epoch_losses=epochs, steps=total,
                       samples_per_s=seen / max(step_s, 1e-9), data_share=fetch_s / max(step_s, 1e-9),
                       is_main=acc.is_main_process)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order."""
    h = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_ranks_agree(model: torch.nn.Module, acc, name: str) -> None:
    """Data parallelism must leave every rank with the same weights; say so, or fail."""
    digest = weights_digest(model)
    code = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=acc.device)
    codes = acc.gather(code)
    if not bool((codes == codes[0]).all()):
        raise PipelineError(f"train {name}: the {acc.num_processes} processes ended with different weights")
    acc.print(f"train {name}: {acc.num_processes} processes ended with identical weights ({digest[:12]})")


def _make_ema(model: torch.nn.Module, decay: float):
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=decay, use_ema_warmup=False)


class Checkpoints:
    """``save_state`` folders ``step-00000200`` under one directory: atomic, newest K kept.

    A checkpoint records the run's fingerprint (params, data); checkpoints of another
    run are deleted instead of resumed, so a changed ``lr`` never resumes an old run.
    """

    def __init__(self, root: Path, fingerprint: str, keep: int, acc):
        self.root, self.fingerprint, self.keep, self.acc = root, fingerprint, max(1, keep), acc

    def _all(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "trainer_state.json").is_file())

    def latest(self) -> Path | None:
        found = self._all()
        return found[-1] if found else None

    def resume(self) -> dict:
        latest = self.latest()
        if latest is None:
            return {}
        state = json.loads((latest / "trainer_state.json").read_text())
        if state.get("fingerprint") != self.fingerprint:
            self.acc.print(f"{self.root}: checkpoints belong to other params or data; starting afresh")
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                shutil.rmtree(self.root)
            self.acc.wait_for_everyone()
            return {}
        self.acc.load_state(str(latest))
        return state

    def save(self, step: int, extra: dict) -> None:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)
        if self.acc.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint, **extra}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._all()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
