"""The training loop's checkpoints: Accelerate ``save_state`` folders, atomic, keyed by the run.

Usage (``fashiondiff.train.loop``)::

    checkpoint_trainable_only(acc, model)            # before the first save or load
    ckpts = Checkpoints(Path("checkpoints/prior"), plan_fingerprint(run, world, plan), keep=2, acc=acc)
    state = ckpts.resume()                           # {} or the newest checkpoint's trainer_state
    ckpts.save(step, {"history": ...})               # every rank; atomic; the newest ``keep`` kept

A checkpoint holds what training changes (the trainable parameters, their optimiser, schedule
and EMA state, every rank's RNG state) and records the run's fingerprint: checkpoints of
another run (other params, data or step plan) are deleted, never resumed. A write that fails
(a full disk, most often) leaves the previous checkpoint the newest and says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fashiondiff.errors import PipelineError, first_line
from fashiondiff.io import DISK_FULL


def plan_fingerprint(fingerprint: str, world: int, plan) -> str:
    """The caller's fingerprint (params, data) joined with what shapes the step plan here:
    one process's checkpoint at step 600 means another step in a two-process run."""
    blob = json.dumps(
        {
            "run": fingerprint,
            "processes": world,
            "per_rank": plan.per_rank,
            "steps_per_epoch": plan.steps_per_epoch,
            "total": plan.total,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def checkpoint_trainable_only(acc, model: torch.nn.Module) -> None:
    """Checkpoints hold what training changes: the trainable parameters (with their optimiser,
    schedule and EMA state, which only ever cover those). The frozen rest is the base model a
    resumed run loads anyway, and with LoRA it is nearly all of the model's bytes.

    Accelerate saves and strictly loads every model's whole state_dict; these hooks narrow
    the saved dict and load the narrowed file themselves.
    """
    names = {name for name, p in model.named_parameters() if p.requires_grad}

    def bare(key: str) -> str:
        return key.removeprefix("module.")  # DistributedDataParallel's prefix

    def save(models: list, weights: list[dict], output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if bare(k) in names}

    def load(models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        if not models:  # no model registered (nothing to load)
            return
        path = Path(input_dir) / "model.safetensors"
        # safetensors takes "cpu" or "cuda:N"; a multi-process CPU run's device prints as "cpu:0"
        device = "cpu" if acc.device.type == "cpu" else str(acc.device)
        state = {bare(k): v for k, v in load_file(str(path), device=device).items()}
        missing = names - set(state)
        if missing:
            raise PipelineError(
                f"{path}: checkpoint lacks {len(missing)} trained parameters "
                f"(e.g. {sorted(missing)[0]}); delete {Path(input_dir).parent} to start afresh"
            )
        unexpected = acc.unwrap_model(models[0]).load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise PipelineError(
                f"{path}: checkpoint holds parameters this model lacks (e.g. {unexpected[0]}); "
                f"delete {Path(input_dir).parent} to start afresh"
            )
        models.pop(0)  # loaded: Accelerate's strict load would want the frozen weights too

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def _write_error(exc: Exception) -> str:
    """What went wrong writing a file, in a few words. A full disk or a file-size limit reaches
    us as OSError (pickle), as SafetensorError naming the OS error, or as torch.save's bare
    "unexpected pos" RuntimeError."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return exc.strerror
    return f"{type(exc).__name__}: {first_line(exc)}"


class Checkpoints:
    """``save_state`` folders ``step-00000200`` under one directory: atomic, newest K kept.

    A checkpoint records the run's fingerprint (params, data); checkpoints of another
    run are deleted instead of resumed, so a changed ``lr`` never resumes an old run.
    """

    def __init__(self, root: Path, fingerprint: str, keep: int, acc):
        self.root, self.fingerprint, self.keep, self.acc = root, fingerprint, max(1, keep), acc
        self.seconds = 0.0  # spent in save(), barriers included: what checkpointing costs the run

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
        started = time.perf_counter()
        self._save(step, extra)
        self.seconds += time.perf_counter() - started

    def _save(self, step: int, extra: dict) -> None:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self._write(step, tmp, lambda: self.acc.save_state(str(tmp), safe_serialization=True))
        # Every rank writes its own RNG state into tmp and save_state has no barrier after it:
        # rename only once all have (else a slow rank recreated tmp, or crashed writing into it).
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = {"step": step, "fingerprint": self.fingerprint, **extra}
            self._write(step, tmp, lambda: (tmp / "trainer_state.json").write_text(json.dumps(state)))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self._all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _write(self, step: int, tmp: Path, write: Callable[[], object]) -> None:
        """Run ``write`` into ``tmp``; if it fails (a full disk, most often), drop ``tmp`` and say
        so in one line: the previous checkpoint stays the newest."""
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - torch.save, safetensors and pickle each fail their own way
            shutil.rmtree(tmp, ignore_errors=True)
            raise PipelineError(
                f"{tmp}: cannot write the checkpoint of step {step} ({_write_error(exc)}); "
                f"the previous checkpoint is kept ({self.latest() or 'none'}): free space "
                f"and rerun to resume"
            ) from exc
