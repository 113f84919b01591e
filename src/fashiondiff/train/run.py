"""What both training stages do around the loop: load, train, save, report.

Usage (from a stage)::

    paths = TrainPaths(cache="data/cache/train", out="models/prior", checkpoints="checkpoints/prior",
                       summary="reports/train_prior.json", plot="reports/plots/train_prior.csv",
                       val_cache="data/cache/validation")
    run_training("prior", params, paths, tracker)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fashiondiff.cache.format import cache_identity
from fashiondiff.cache.reader import open_cache
from fashiondiff.disk import Need, checkpoint_bytes, checkpoints_at_peak, folder_bytes, gb, require
from fashiondiff.errors import PipelineError, Stopped
from fashiondiff.io import atomic_dir, atomic_file, write_json
from fashiondiff.models.adapter import ADAPTER_DIR, has_adapter, save_adapter
from fashiondiff.project import checkpoint_home
from fashiondiff.train.loop import Schedule, TrainResult, train
from fashiondiff.train.lora import add_lora, merge_adapter
from fashiondiff.train.objective import Objective
from fashiondiff.train.validate import Validator
from fashiondiff.training_summary import summary_metrics

KINDS = ("prior", "decoder")


@dataclass(frozen=True)
class TrainPaths:
    """Where a training reads and writes: the paths dvc.yaml's cmd gives train/stage.py's flags
    (the same names), said once there."""

    cache: str  # the training split's embedding cache (from embed)
    out: str  # the tuned pipeline folder
    checkpoints: str  # persistent checkpoints; relative: under the project's root (fashiondiff.project)
    summary: str  # JSON of the run's summary: final losses, steps
    plot: str  # CSV of the loss curve (DVC plots)
    val_cache: str | None = None  # the held-out cache: validation during training, when given
    val_plot: str | None = None  # CSV of the validation curve
    val_pictures: str | None = None  # folder for the last validation's pictures


def schedule(params) -> Schedule:
    return Schedule(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr, seed=params.seed)


def set_trainable(module: torch.nn.Module, spec: str, key: str) -> int:
    """``all``, or a comma-separated list of parameter-name prefixes; returns the count trained."""
    if spec.strip() == "all":
        module.requires_grad_(True)
    else:
        prefixes = tuple(p.strip() for p in spec.split(",") if p.strip())
        module.requires_grad_(False)
        for name, param in module.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(True)
    count = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if count == 0:
        raise PipelineError(f"params: {key}={spec!r} matches no parameter of the model")
    return count


def prepare(model: torch.nn.Module, section, key: str) -> int:
    """What the loop trains: a LoRA adapter (``lora_rank > 0``, base frozen) or the
    parameters ``trainable`` selects. Returns the trainable parameter count."""
    if section.lora_rank > 0:
        return add_lora(model, section, key)
    return set_trainable(model, section.trainable, f"{key}.trainable")


@dataclass
class BaseParts:
    """What training holds of a base pipeline: the trained network and its scheduler, not the
    frozen encoders (the cache holds their outputs). ``pipe.prior`` / ``pipe.unet`` name the
    network as on a diffusers pipeline; save_pipeline copies the rest from ``folder``."""

    folder: Path  # the base pipeline folder (a Hub id resolved to its local snapshot)
    key: str  # the params key that named it
    component: str  # "prior" or "unet"
    network: torch.nn.Module
    scheduler: object

    def __getattr__(self, name: str):
        if name != "component" and name == self.__dict__.get("component"):
            return self.network
        raise AttributeError(name)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".onnx", ".pb")


def load_base(kind: str, params) -> BaseParts:
    from fashiondiff.models.loader import load_component, resolve

    key, component = ("model.prior", "prior") if kind == "prior" else ("model.decoder", "unet")
    name = params.model.prior if kind == "prior" else params.model.decoder
    return BaseParts(
        folder=Path(resolve(name, key)),
        key=key,
        component=component,
        network=load_component(name, component, key),
        scheduler=load_component(name, "scheduler", key),
    )


def make_task(kind: str, params, cache):
    """The base's trained network and scheduler (see BaseParts) and the task that trains it."""
    if kind == "prior":
        from fashiondiff.train.prior import PriorTask

        pipe = load_base("prior", params)
        prepare(pipe.prior, params.prior, "prior")
        return pipe, PriorTask(
            pipe.prior,
            pipe.scheduler,
            cache,
            params.prior.text_dropout,
            Objective.from_params(params.train, pipe.scheduler),
        )
    from fashiondiff.train.decoder import DecoderTask

    pipe = load_base("decoder", params)
    prepare(pipe.unet, params.decoder, "decoder")
    if params.decoder.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    task = DecoderTask(
        pipe.unet,
        pipe.scheduler,
        cache,
        params.decoder.text_dropout,
        params.decoder.image_dropout,
        Objective.from_params(params.train, pipe.scheduler),
    )
    return pipe, task


def _identity(params) -> dict:
    return cache_identity(
        params.model.prior, params.model.decoder, params.clip_image_size, params.model.resolution, params.embed.dtype
    )


def fingerprint(kind: str, params, cache_meta: dict) -> str:
    """What a checkpoint must share with this run to be resumed."""
    section = params.prior if kind == "prior" else params.decoder
    blob = json.dumps(
        {
            "kind": kind,
            "train": params.train.model_dump(),
            "schedule": dataclasses.asdict(schedule(params)),
            "section": section.model_dump(),
            "cache": cache_meta["fingerprint"],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def run_training(kind: str, params, paths: TrainPaths, tracker) -> dict | None:
    """Train, save the pipeline and the reports. With ``paths.val_cache``: validation during
    training (``fashiondiff.train.validate``), its curve to ``paths.val_plot``, its last pictures
    to ``paths.val_pictures``, the last validation's numbers in the summary. Checkpoints go to a
    folder of this run's own under ``paths.checkpoints`` (relative: under the project's root,
    which outlives DVC's temporary copies; see fashiondiff.project)."""
    if kind not in KINDS:
        raise PipelineError(f"unknown model kind {kind!r} (prior or decoder)")
    torch.manual_seed(params.seed)
    cache = open_cache(paths.cache, expect=_identity(params))
    pipe, task = make_task(kind, params, cache)
    validator = None
    if paths.val_cache:
        validator = Validator(kind, task, open_cache(paths.val_cache, expect=_identity(params)), params, tracker)
    run = fingerprint(kind, params, cache.meta)
    with checkpoint_home(paths.checkpoints, run, rank=int(os.environ.get("RANK", "0"))) as home:
        check_disk(kind, params, task.model, home, paths.out)
        try:
            result = train(task, params.train, schedule(params), home, run, log=tracker.log_metrics, validate=validator)
        except Stopped as stop:  # preempted: the checkpoint of stop.step is saved; say so on the run
            tracker.log_metrics({"stopped_at_step": stop.step}, step=stop.step)
            raise
        if not result.is_main:
            return None
        summary = write_outputs(pipe, params, result, len(cache), validator, paths)
    tracker.log_summary(summary_metrics(summary))  # what register rebuilds from the summary file
    tracker.log_params(
        {
            "model_dir": str(Path(paths.out).resolve()),
            "checkpoint_dir": str(home),
            # batch_size is the global batch; how this run split it
            "batch_global": result.batch_global,
            "batch_per_process": result.batch_per_process,
            "processes": result.processes,
        }
    )
    for path in (paths.summary, paths.plot, Path(paths.out) / "fashiondiff_config.json"):
        tracker.log_artifact(path)
    if (Path(paths.out) / ADAPTER_DIR).is_dir():
        tracker.log_artifact(Path(paths.out) / ADAPTER_DIR)  # the small file worth keeping per run
    # validation_share: validation's wall time against the steps' (this process's, since any resume)
    # (0 when no step ran here: a rerun that found the finished checkpoint)
    validation_share = result.validation_s / result.train_s if result.train_s > 0 else 0.0
    checkpoint_share = result.checkpoint_s / result.train_s if result.train_s > 0 else 0.0
    tracker.log_metrics(
        {
            "samples_per_s_mean": result.samples_per_s,
            "data_share": result.data_share,
            "checkpoint_seconds": result.checkpoint_s,
            "train_s": result.train_s,
            "validation_s_total": result.validation_s,
            "validation_share": validation_share,
            "checkpoint_share": checkpoint_share,
        }
    )
    print(
        f"train {kind}: loss {summary['loss_first_epoch']:.4f} (first epoch) -> "
        f"{summary['loss_last_epoch']:.4f} (last), {result.samples_per_s:.0f} samples/s, "
        f"data {100 * result.data_share:.1f}% of step time; steps {result.train_s:.1f} s, "
        f"validation {result.validation_s:.1f} s ({100 * validation_share:.1f}%), "
        f"checkpoints {result.checkpoint_s:.1f} s ({100 * checkpoint_share:.1f}%)"
    )
    return summary


def check_disk(kind: str, params, model: torch.nn.Module, home: Path, out_dir: str) -> None:
    """Before the first step: room for the checkpoints (``train.checkpoints_keep`` of them, one
    more while a save replaces the oldest; those already in ``home`` are counted as free: they
    rotate out) and for the tuned model (the base folder's size: the same pipeline is saved)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    each = checkpoint_bytes(trainable, ema=params.train.ema_decay > 0)
    count = checkpoints_at_peak(params.train.checkpoints_keep)
    base = getattr(params.model, kind)
    output = folder_bytes(base) or 4 * sum(p.numel() for p in model.parameters())
    needs = [
        Need(home, max(0, count * each - folder_bytes(home)), f"{count} checkpoints x {gb(each)}"),
        Need(out_dir, output, "the tuned model"),
    ]
    require(f"train {kind}", needs, hint="free space there, or lower train.checkpoints_keep")


def write_outputs(pipe: BaseParts, params, result: TrainResult, train_items: int, validator, paths: TrainPaths) -> dict:
    """The stage's outputs: the tuned pipeline, the summary JSON, the loss curve CSV (and the
    validation's curve and pictures); returns the summary."""
    summary = {
        "loss_first_epoch": result.epoch_losses[0],
        "loss_last_epoch": result.epoch_losses[-1],
        "steps": result.steps,
        "epochs": params.epochs,
        "train_items": train_items,
    }
    if validator is not None:
        summary.update(validator.conclude(result))
    save_pipeline(pipe, paths.out, params, summary)
    write_json(paths.summary, summary)
    write_plot(paths.plot, result)
    if validator is not None:
        validator.write(result, paths.val_plot, paths.val_pictures)
    return summary


def save_pipeline(pipe: BaseParts, out_dir: str, params, summary: dict) -> None:
    """The whole tuned pipeline, safetensors, with its resolved config: the base folder's
    model_index.json and untouched components copied byte for byte, the tuned network saved
    into its subfolder.

    A LoRA-trained network first leaves its adapter in ``out_dir/lora/`` and is then
    merged, so the pipeline folder is the same plain diffusers model full fine-tuning
    writes (diffusers ignores the extra subfolder: model_index.json does not name it).
    """
    with atomic_dir(out_dir) as tmp:
        if has_adapter(pipe.network):
            save_adapter(pipe.network, Path(tmp) / ADAPTER_DIR)
            merge_adapter(pipe.network)
        copy_untouched(pipe.folder, Path(tmp), pipe.component, pipe.key)
        pipe.network.save_pretrained(Path(tmp) / pipe.component, safe_serialization=True)
        write_json(Path(tmp) / "fashiondiff_config.json", {"params": params.flat(), "train": summary})


def copy_untouched(base: Path, out: Path, skip: str, key: str) -> None:
    """Copy ``base`` (a diffusers folder, symlinks of a Hub snapshot followed) into ``out``
    except its ``skip`` subfolder, hidden files and weights other than safetensors."""
    import shutil

    def keep(path: Path) -> bool:
        return not path.name.startswith(".") and (path.is_dir() or path.suffix not in WEIGHT_SUFFIXES[1:])

    for entry in sorted(base.iterdir()):
        if entry.name == skip or entry.name == "fashiondiff_config.json" or not keep(entry):
            continue
        if entry.is_dir():
            files = [f for f in entry.rglob("*") if f.is_file() and keep(f)]
            if any(f.suffix in WEIGHT_SUFFIXES for f in entry.rglob("*")) and not any(
                f.suffix == ".safetensors" for f in files
            ):
                raise PipelineError(f"{entry}: no safetensors weights to copy into the tuned pipeline ({key})")
            for f in files:
                target = out / f.relative_to(base)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)
        else:
            shutil.copyfile(entry, out / entry.name)


def write_plot(path: str, result: TrainResult) -> None:
    """Loss curve as CSV (step, epoch, loss, lr) for `dvc plots`."""
    with atomic_file(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "epoch", "loss", "lr"])
        writer.writeheader()
        for point in result.history:
            writer.writerow({k: point[k] for k in ("step", "epoch", "loss", "lr")})
