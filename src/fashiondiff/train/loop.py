"""One training loop (Accelerate) for the prior and the decoder.

A model plugs in through a :class:`Task`: the module to train, a way to fetch a
batch from the embedding cache, and a ``loss(model, batch, draws)``. The loop
owns everything else: data order, gradient accumulation and clipping, the LR
schedule, mixed precision, EMA, checkpoint/resume, NaN guard, logging, preemption.

The batch: ``batch_size`` is the method's **global** batch, the samples of one optimiser
step, whatever the number of processes: each of N processes takes ``batch_size / (N x
train.gradient_accumulation_steps)`` of them per micro-step, and a batch that does not divide
is refused in one line. Optimiser step ``q`` of an epoch takes the items at positions ``q x
batch_size`` on of the epoch's order; micro-step ``m`` of it on process ``r`` takes the
``(m x N + r)``-th share of those.

Reproducibility: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, and
every random draw of a sample (noise, timestep, dropout) comes from a generator of its own,
seeded by ``(seed, optimiser step, cache row)`` (``fashiondiff.train.draws``): the same
draws whichever process takes the sample, so one process and N train the same samples with
the same noise, and differ only by round-off (the gradients are summed in another order;
measured in tests/test_train.py). No global RNG is read, so a run resumed from a checkpoint
(trained weights, optimiser, schedule and EMA restored by ``load_state``) ends with the same
weights, bit for bit on the CPU, as one that never stopped.

Speed on a GPU (issue "the paper's run in a working day"): the host never waits for the
device inside a step. The next batch is fetched, pinned and queued in a background thread
while the step runs; each step's loss stays on the device until the loop *settles* every
``train.log_every`` steps (and before a checkpoint, and at the end): then one transfer
brings the pending losses home, checks them (a non-finite loss stops the run naming its
step, and no checkpoint is ever written after one), logs them and agrees across ranks
whether to stop (SIGTERM). ``train.compile`` compiles the network's forward
(``torch.compile``); on CUDA the loop also uses fused AdamW, cuDNN autotuning and, for
convolutional networks, channels-last memory. On the CPU all of that stays off by default:
compiled and fused kernels change the float results, and the CPU runs are bit-for-bit
reproducible (``dvc repro --force``).

Preemption: SIGTERM (Slurm's time limit, Kubernetes, spot instances) or SIGINT asks the
loop to stop; at the next settle point (at most ``log_every`` steps later) every rank saves
a checkpoint of the finished step and the run ends with :class:`Stopped`, a one-line error;
the rerun resumes bit-identical. A second signal stops at once.

Checkpoints: every ``checkpoint_every`` steps, or, given as a duration ("30m"), at the first
settle point after that much time since the last one (process 0's clock, agreed by all ranks in
the settle's one transfer), so that saving stays a bounded share of the run at any model size.

Validation (``validate``, optional: ``fashiondiff.train.validate``) runs every
``validate_every`` steps (``auto``: :func:`validation_interval`) and at the last step, between
two steps, with the weights the run would save. It is outside the training: it draws from no
stream above (the global RNGs are forked around it), its time is in no step's timing, and the
steps it was done at are recorded in the checkpoints, so a resumed run does not repeat one.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from fashiondiff.batching import split_batch
from fashiondiff.config.schema import duration_s
from fashiondiff.errors import PipelineError, Stopped
from fashiondiff.train.checkpoints import (
    Checkpoints,
    checkpoint_trainable_only,
    plan_fingerprint,
)
from fashiondiff.train.draws import SampleDraws


class Validate(Protocol):
    """Called on every process at a validation step with the unwrapped model holding the weights
    the run would save; returns the step's validation record (the main process's is kept)."""

    def __call__(self, step: int, model: torch.nn.Module) -> dict: ...


class LoopSettings(Protocol):
    """What the loop reads of its settings: params ``train`` (``fashiondiff.config.train.TrainParams``)
    for the fine-tuning, the stand-in pre-training's own (``standin.generator.loop_settings``).
    A protocol, not that class: the pre-training stage runs this loop but must not import the
    training sections' module, or every new training option would rerun it (docs/stale-map.md)."""

    gradient_accumulation_steps: int
    max_grad_norm: float  # <= 0: no clipping
    warmup_steps: int
    lr_schedule: str  # a diffusers get_scheduler name
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    mixed_precision: str  # no, fp16, bf16
    ema_decay: float  # 0: no EMA
    ema_device: str  # auto (where the model trains), cpu
    ema_every: int  # optimiser steps between EMA updates
    optimizer: str  # adamw, adamw8bit (bitsandbytes, CUDA)
    checkpoint_every: int | str  # steps, or a duration ("30m")
    checkpoints_keep: int
    log_every: int
    compile: str  # auto, on, off
    validate_every: int | str  # auto, or steps (0: the last step only)


class Task(Protocol):
    name: str
    model: torch.nn.Module

    def __len__(self) -> int: ...

    def batch(self, index: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], draws: SampleDraws) -> torch.Tensor: ...


@dataclass(frozen=True)
class Schedule:
    """The method's top-level hyperparameters the loop needs beside ``params.train``."""

    epochs: int
    batch_size: int  # the global batch: the samples of one optimiser step, all processes together
    lr: float
    seed: int


@dataclass
class TrainResult:
    model: torch.nn.Module  # unwrapped; EMA weights copied in when EMA is on
    history: list[dict] = field(default_factory=list)  # logged points: step, epoch, loss, lr
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    samples_per_s: float = 0.0
    data_share: float = 0.0  # fraction of the loop's time spent waiting for batches
    checkpoint_s: float = 0.0  # seconds spent saving checkpoints (the final one included)
    is_main: bool = True
    validations: list[dict] = field(default_factory=list)  # each validation's record, by step
    train_s: float = 0.0  # time this process spent in steps (since any resume)
    validation_s: float = 0.0  # time it spent validating, outside the steps' timings
    batch_global: int = 0  # samples per optimiser step, all processes together
    batch_per_process: int = 0  # samples per micro-step on one process
    processes: int = 1


ORDER_STREAM = 0  # SeedSequence([seed, epoch, ORDER_STREAM]): data order, apart from step draws


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, ORDER_STREAM]).permutation(n)


@dataclass(frozen=True)
class _Plan:
    per_rank: int  # samples per micro-step on one process
    steps_per_epoch: int  # micro-steps (the loop's steps): optimiser steps x accumulation
    total: int
    accumulation: int = 1  # micro-steps per optimiser step (train.gradient_accumulation_steps)
    processes: int = 1

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.processes * self.accumulation


def _plan(n: int, sched: Schedule, world: int, accumulation: int, acc) -> _Plan:
    per_rank = split_batch(sched.batch_size, world, accumulation)
    parts = world * accumulation
    if n < per_rank * parts:
        per_rank = max(1, n // parts)
        acc.print(f"{n} items < batch_size {sched.batch_size}; using a global batch of {per_rank * parts}")
    # the last partial global batch of an epoch is dropped
    steps_per_epoch = n // (per_rank * parts) * accumulation
    return _Plan(per_rank, steps_per_epoch, steps_per_epoch * sched.epochs, accumulation, world)


@dataclass(frozen=True)
class Speed:
    """How the step runs on this device (see the module doc; ``train.compile``: auto, on, off)."""

    compile: bool
    fused_adamw: bool
    channels_last: bool
    pin_memory: bool

    @classmethod
    def choose(cls, cfg: LoopSettings, device: torch.device, model: torch.nn.Module) -> Speed:
        cuda = device.type == "cuda"
        convolutional = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        return cls(
            compile=cfg.compile == "on" or (cfg.compile == "auto" and cuda),
            fused_adamw=cuda,
            channels_last=cuda and convolutional,
            pin_memory=cuda,
        )


class _Batches:
    """Each step's batch, fetched (and pinned) in a background thread one step ahead.

    A batch is a pure function of its step (the data order), so fetching ahead changes no
    number; it only takes the host's work (memory-mapped reads, padding, copies) off the
    device's critical path.
    """

    def __init__(self, task: Task, plan: _Plan, n: int, sched: Schedule, world: int, rank: int, speed: Speed):
        self.task, self.plan, self.n, self.sched, self.world, self.rank = task, plan, n, sched, world, rank
        self.speed = speed
        self._orders: dict[int, np.ndarray] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fashiondiff-batches")
        self._next: tuple[int, object] | None = None
        self.wait_s = 0.0

    def index(self, step: int) -> np.ndarray:
        """The cache rows of micro-step ``step`` on this process (sorted: reads in file order)."""
        epoch, k = divmod(step, self.plan.steps_per_epoch)
        orders = self._orders  # the prefetch thread and the loop both call this: one read of the dict
        if epoch not in orders:
            orders = {**orders, epoch: epoch_order(self.n, self.sched.seed, epoch)}
            self._orders = {e: orders[e] for e in sorted(orders)[-2:]}  # this epoch and the next
        q, micro = divmod(k, self.plan.accumulation)
        lo = q * self.plan.global_batch + (micro * self.world + self.rank) * self.plan.per_rank
        return np.sort(orders[epoch][lo : lo + self.plan.per_rank])

    def _fetch(self, step: int) -> dict[str, torch.Tensor]:
        batch = self.task.batch(self.index(step), torch.device("cpu"))
        return {k: v.pin_memory() for k, v in batch.items()} if self.speed.pin_memory else batch

    def get(self, step: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Step ``step``'s batch on ``device``; starts fetching step + 1's."""
        started = time.perf_counter()
        if self._next is not None and self._next[0] == step:
            batch = self._next[1].result()
        else:
            batch = self._fetch(step)
        self.wait_s += time.perf_counter() - started
        if step + 1 < self.plan.total:
            self._next = (step + 1, self._pool.submit(self._fetch, step + 1))
        memory = torch.channels_last if self.speed.channels_last else torch.preserve_format
        return {
            k: v.to(device, non_blocking=True, memory_format=memory if v.dim() == 4 else torch.preserve_format)
            for k, v in batch.items()
        }

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Progress:
    """Logged points, per-epoch loss sums and timings; the first two go into checkpoints."""

    def __init__(self, state: dict):
        self.history: list[dict] = state.get("history", [])
        self.epoch_sums = {int(k): tuple(v) for k, v in state.get("epoch_sums", {}).items()}
        self.validations: list[dict] = state.get("validations", [])
        self.window: list[float] = []
        self.seen, self.seconds, self.validate_s = 0, 0.0, 0.0

    def add(self, epoch: int, loss: float) -> None:
        self.window.append(loss)
        total, count = self.epoch_sums.get(epoch, (0.0, 0))
        self.epoch_sums[epoch] = (total + loss, count + 1)

    def point(self, step: int, epoch: int, lr: float) -> dict:
        point = {"step": step, "epoch": epoch, "loss": float(np.mean(self.window)), "lr": lr}
        self.history.append(point)
        self.window = []
        return point

    def timed(self, samples: int, seconds: float) -> None:
        self.seen, self.seconds = self.seen + samples, self.seconds + seconds

    @property
    def speed(self) -> float:
        return self.seen / max(self.seconds, 1e-9)

    def state(self) -> dict:
        state = {"history": self.history, "epoch_sums": self.epoch_sums}
        if self.validations:  # a run without validation writes the checkpoint it always wrote
            state["validations"] = self.validations
        return state

    def epoch_losses(self) -> list[float]:
        return [total / count for _, (total, count) in sorted(self.epoch_sums.items())]


class _StopRequest:
    """SIGTERM / SIGINT ask the loop to stop at its next settle point; a second one stops at once.

    Installed only in the main thread (signal handlers cannot be set elsewhere: a pool
    process's training thread keeps the default behaviour)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _prepare(acc, task: Task, cfg: LoopSettings, lr: float, plan: _Plan, speed: Speed):
    from diffusers.optimization import get_scheduler

    trainable = [p for p in task.model.parameters() if p.requires_grad]
    if not trainable:
        raise PipelineError(f"{task.name}: no trainable parameters (check {task.name}.trainable)")
    if speed.channels_last:
        task.model.to(memory_format=torch.channels_last)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(trainable, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            trainable,
            lr=lr,
            betas=betas,
            weight_decay=cfg.weight_decay,
            **({"fused": True} if speed.fused_adamw else {}),
        )
    schedule = get_scheduler(
        cfg.lr_schedule,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=math.ceil(plan.total / cfg.gradient_accumulation_steps),
    )
    ema = _make_ema(trainable, cfg.ema_decay, cfg.ema_device)
    if speed.compile:
        task.model.compile()  # in place: the state_dict keeps its names (checkpoints, saving)
    model, optimizer = acc.prepare(task.model, optimizer)
    checkpoint_trainable_only(acc, task.model)
    acc.register_for_checkpointing(schedule)  # stepped by us once per optimiser step
    if ema is not None:
        acc.register_for_checkpointing(ema)
    return model, optimizer, schedule, ema, trainable


def train(
    task: Task,
    cfg: LoopSettings,
    sched: Schedule,
    checkpoint_dir: str | Path,
    fingerprint: str,
    log: Callable[[dict, int], None] | None = None,
    validate: Validate | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``task.model``; resume from ``checkpoint_dir`` if it holds a run with ``fingerprint``
    and the same step plan (processes, batch per process, steps). ``log(metrics, step)`` gets
    each logged point (main process); ``validate``: see the module doc; ``on_step(step)`` is
    called once each step's work is queued (a profiler's clock, bench/bench_gpu_train.py)."""
    from accelerate import Accelerator

    _check_replicas()
    acc = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision)
    _check_optimizer(cfg.optimizer, acc.device)
    world, rank, n = acc.num_processes, acc.process_index, len(task)
    plan = _plan(n, sched, world, cfg.gradient_accumulation_steps, acc)
    speed = Speed.choose(cfg, acc.device, task.model)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
    model, optimizer, schedule, ema, trainable = _prepare(acc, task, cfg, sched.lr, plan, speed)
    ckpts = Checkpoints(Path(checkpoint_dir), plan_fingerprint(fingerprint, world, plan), cfg.checkpoints_keep, acc)
    period = duration_s(cfg.checkpoint_every)  # None: every checkpoint_every steps
    every = validation_interval(cfg.validate_every, plan, getattr(validate, "forward_passes", 0))
    state = ckpts.resume()
    start = state.get("step", 0)
    progress = _Progress(state)
    acc.step = start  # Accelerate's micro-step counter decides when accumulated gradients sync
    if start:
        acc.print(f"{task.name}: resumed from step {start} of {plan.total} ({ckpts.latest()})")
    if validate is not None and cfg.validate_every == "auto":
        acc.print(f"train {task.name}: validating every {every} steps of {plan.total} (train.validate_every auto)")

    def optimise(loss: torch.Tensor) -> None:
        acc.backward(loss)
        if acc.sync_gradients:
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None and schedule.last_epoch % cfg.ema_every == 0:  # optimiser steps so far
                ema.step(trainable)

    batches = _Batches(task, plan, n, sched, world, rank, speed)
    pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on the device) not yet settled
    clock = [time.perf_counter(), 0]  # start of the timed stretch, its first step
    saved_at = [time.monotonic()]  # the last checkpoint (or the start): the time form's clock

    def settle(step: int) -> tuple[int, bool]:
        """Bring the losses of the steps before ``step`` home: check, record, log; and agree
        across ranks on a stop request and on whether a timed checkpoint is due. Returns the
        signal that asks to stop (0: none) and that decision."""
        if not pending:
            return 0, False
        losses = torch.stack([loss for _, _, loss in pending]).float()
        due = period is not None and acc.is_main_process and time.monotonic() - saved_at[0] >= period
        flag = torch.tensor([float(stop.signum), float(due)], device=losses.device)
        gathered = acc.gather(torch.cat([losses, flag]).reshape(1, -1)).reshape(world, -1)
        means = gathered[:, :-2].mean(dim=0).tolist()  # one transfer: the host waits here only
        signum, due = int(gathered[:, -2].max().item()), bool(gathered[:, -1].max().item())
        now = time.perf_counter()
        progress.timed((step - clock[1]) * plan.per_rank * world, now - clock[0])
        clock[0], clock[1] = now, step
        for (s, lr, _), loss in zip(pending, means):
            epoch = s // plan.steps_per_epoch
            if not math.isfinite(loss):
                raise PipelineError(
                    f"train {task.name}: loss is {loss} at step {s} (epoch {epoch}); "
                    f"stopped, last good checkpoint kept: {ckpts.latest() or 'none'}"
                )
            progress.add(epoch, loss)
            if (s + 1) % cfg.log_every == 0 or s + 1 == plan.total:
                point = progress.point(s + 1, epoch, lr)
                bar.set_postfix(loss=f"{point['loss']:.4f}", samples_s=f"{progress.speed:.0f}")
                if log is not None and acc.is_main_process:
                    log({"loss": point["loss"], "lr": point["lr"], "samples_per_s": progress.speed}, s + 1)
        pending.clear()
        return signum, due

    bar = tqdm(
        total=plan.total,
        initial=start,
        desc=f"train {task.name}",
        unit="step",
        disable=not acc.is_main_process,
        dynamic_ncols=True,
    )
    model.train()
    clock[1] = start
    try:
        with _StopRequest() as stop:
            for step in range(start, plan.total):
                lr = schedule.get_last_lr()[0]  # the rate this step's update uses
                batch = batches.get(step, acc.device)
                draws = SampleDraws(sched.seed, step // plan.accumulation, batches.index(step), acc.device)
                with acc.accumulate(model):
                    with acc.autocast():
                        loss = task.loss(model, batch, draws)
                    optimise(loss)
                pending.append((step, lr, loss.detach()))
                bar.update(1)
                if on_step is not None:
                    on_step(step)
                done = step + 1
                at_checkpoint = period is None and done % cfg.checkpoint_every == 0 and done < plan.total
                signum = 0
                if done % cfg.log_every == 0 or at_checkpoint or done == plan.total:
                    signum, due = settle(done)
                    at_checkpoint |= due and done < plan.total and done % cfg.gradient_accumulation_steps == 0
                # Before the checkpoint of the same step: a run resumed from it has done this one.
                if validate is not None and _validation_due(done, every, plan.total, progress):
                    clock[0] += _validate(validate, done, acc, model, ema, trainable, progress)
                if signum and done < plan.total:
                    _stop(ckpts, done, progress, plan, task.name, signum, acc)
                if at_checkpoint:
                    ckpts.save(done, progress.state())
                    saved_at[0] = time.monotonic()
            settle(plan.total)
    finally:
        batches.close()
        bar.close()
    acc.wait_for_everyone()
    final = acc.unwrap_model(model)
    if ema is not None:
        ema.copy_to(trainable)
    if world > 1:
        _check_ranks_agree(final, acc, task.name)
    ckpts.save(plan.total, progress.state())
    return TrainResult(
        model=final,
        history=progress.history,
        epoch_losses=progress.epoch_losses(),
        steps=plan.total,
        samples_per_s=progress.speed,
        data_share=batches.wait_s / max(progress.seconds, 1e-9),
        checkpoint_s=ckpts.seconds,
        is_main=acc.is_main_process,
        validations=progress.validations,
        train_s=progress.seconds,
        validation_s=progress.validate_s,
        batch_global=plan.global_batch,
        batch_per_process=plan.per_rank,
        processes=world,
    )


VALIDATIONS_AT_MOST = 20  # validate_every auto: validations per run, at most (and the last step)
VALIDATION_SHARE = 0.05  # auto: a validation's forward passes against the steps' between two


def validation_interval(validate_every: int | str, plan: _Plan, forward_passes: int) -> int:
    """``train.validate_every`` in steps. ``auto``: at most VALIDATIONS_AT_MOST validations, spaced
    so that one validation's ``forward_passes`` (the validator's count: the held-out cache's rows
    plus the pictures' denoising passes) stay under VALIDATION_SHARE of the steps between two, a
    step costing three forward passes per sample of a process's batch (forward and backward; the
    processes step together, process 0 validates alone). A count, not a clock: the steps
    validated at, and so the curve, are the same on every machine."""
    if validate_every != "auto":
        return int(validate_every)
    step_passes = 3 * plan.per_rank
    by_cost = math.ceil(forward_passes / (VALIDATION_SHARE * step_passes))
    return max(1, by_cost, math.ceil(plan.total / VALIDATIONS_AT_MOST))


def _validation_due(step: int, every: int, total: int, progress: _Progress) -> bool:
    """Every ``every`` steps (0: none) and at the last, unless a checkpoint says it was done."""
    due = step == total or (every > 0 and step % every == 0)
    return due and all(v["step"] != step for v in progress.validations)


def _validate(validate: Validate, step: int, acc, model, ema, trainable: list, progress: _Progress) -> float:
    """``validate`` with the weights the run would save (the EMA's, swapped in and back bit for
    bit) and the global RNGs forked (whatever it draws, LoRA dropout's stream is untouched).
    Returns the seconds it took: the caller leaves them out of the steps' timing."""
    start = time.perf_counter()
    if ema is not None:
        ema.store(trainable)
        ema.copy_to(trainable)
    cuda = [acc.device.index or 0] if acc.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            record = validate(step, acc.unwrap_model(model))
    finally:
        if ema is not None:
            ema.restore(trainable)
    progress.validations.append({**record, "step": step})
    seconds = time.perf_counter() - start
    progress.validate_s += seconds
    return seconds


def _stop(ckpts: Checkpoints, step: int, progress: _Progress, plan: _Plan, name: str, signum: int, acc) -> None:
    """Save the finished step on every rank and end the run with a one-line Stopped."""
    ckpts.save(step, progress.state())
    saved = ckpts.latest()
    acc.print(f"train {name}: {signal.Signals(signum).name} received: checkpoint {saved} saved")
    raise Stopped(
        f"train {name}: stopped by {signal.Signals(signum).name} at step {step} of {plan.total}; "
        f"checkpoint {saved} saved: rerun to resume",
        signum,
        step,
    )


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
    # 60 bits of the digest fit a signed int64, which every backend can gather.
    code = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=acc.device)
    codes = acc.gather(code)
    if not bool((codes == codes[0]).all()):
        raise PipelineError(f"train {name}: the {acc.num_processes} processes ended with different weights")
    acc.print(f"train {name}: {acc.num_processes} processes ended with identical weights ({digest[:12]})")


REPLICA_ONLY = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM")


def _check_replicas() -> None:
    """Before the Accelerator is built: the loop is data parallel over full replicas (the
    ranks' check, the EMA, save_pretrained read whole weights); a sharded launch stops here."""
    sharded = [k for k in REPLICA_ONLY if os.environ.get(k, "").lower() in ("1", "true", "yes")]
    if sharded:
        raise PipelineError(
            f"train: {sharded[0].removeprefix('ACCELERATE_USE_')} is set by the launcher; "
            f"training runs data parallel over full replicas only (docs/distributed.md): "
            f"launch without it"
        )


def _check_optimizer(name: str, device: torch.device) -> None:
    """Before anything is loaded: an optimiser that cannot run here stops the run in one line."""
    if name != "adamw8bit":
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError(
            "params: train.optimizer adamw8bit needs the bitsandbytes package "
            "(pip install bitsandbytes), not installed here; or use adamw"
        ) from None
    if device.type != "cuda":
        raise PipelineError(
            f"params: train.optimizer adamw8bit (bitsandbytes' AdamW8bit) runs on a CUDA "
            f"device; this run is on {device.type}: use adamw"
        )


def _make_ema(trainable: list[torch.nn.Parameter], decay: float, device: str):
    """An EMA of the trained parameters only: a frozen weight's average is itself, and
    with LoRA the frozen base is nearly the whole model (its copy would cost 4 bytes each).
    ``device`` cpu keeps the average in host memory (4 bytes per trained parameter off the
    accelerator), updated from host copies."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(trainable, decay=decay, use_ema_warmup=False)
    if device == "cpu" and any(p.device.type != "cpu" for p in trainable):
        ema.to("cpu")
        return _HostEma(ema)
    return ema


class _HostEma:
    """diffusers' EMAModel kept on the CPU: each update reads host copies of the weights
    (marked trainable, which EMAModel.step averages; it copies untrainable ones)."""

    def __init__(self, ema) -> None:
        self.ema = ema

    def step(self, parameters: list[torch.nn.Parameter]) -> None:
        self.ema.step([p.detach().to("cpu").requires_grad_(True) for p in parameters])

    def copy_to(self, parameters) -> None:
        self.ema.copy_to(parameters)

    def store(self, parameters) -> None:
        self.ema.store(parameters)

    def restore(self, parameters) -> None:
        self.ema.restore(parameters)

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)
