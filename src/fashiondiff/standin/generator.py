"""Pre-train the embedded base's prior and U-Net on the generic domain, with the project's loop.

Kandinsky 2.1's prior and decoder had learned to draw the world (LAION) before anyone
fine-tuned them on a catalogue. The stand-in's learn to draw the generic domain
(everyday objects in a room, ``fashiondiff.standin.generic``) here, through exactly
what the fine-tuning stages run: the extraction (``data.extract``), the embedding cache
(``embed.cache``, made by the freshly pre-trained encoders), the two tasks' losses
(``train.prior``, ``train.decoder``) and the one training loop (``train.loop``), with its
checkpoints: a killed pre-training resumes where it stopped. The base therefore never
sees a garment's shape; it knows the colours and materials the two domains share.

The U-Net trains in a second process (one thread each, the project's CPU rule) while
the prior trains in this one. Usage::

    cache = generic_cache(parts, "data/synthetic/generic_train.h5", "{name}", 224, 64, work)
    curves = pretrain_generator(parts, cache, params.standin.pretrain.generator, seed=0,
                                checkpoints="checkpoints/pretrain", pool=pool)
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from fashiondiff.cache.reader import open_cache
from fashiondiff.config.standin import GeneratorParams
from fashiondiff.data.extract import extract
from fashiondiff.embed.encoders import Encoders
from fashiondiff.embed.writer import build_cache
from fashiondiff.project import checkpoint_home
from fashiondiff.runtime import seed_everything
from fashiondiff.standin.tiny import TinyParts, split_clip
from fashiondiff.train.decoder import DecoderTask
from fashiondiff.train.loop import LoopSettings, Schedule, train, weights_digest
from fashiondiff.train.prior import PriorTask

ORIGIN = "embedded-pretrain"  # what the cache records as the encoders' source


def tiny_encoders(parts: TinyParts) -> Encoders:
    """The pre-trained tiny encoders, as the embed stage would load them from the saved folders."""
    text, vision = split_clip(parts.clip)
    for module in (parts.mclip, parts.movq):
        module.eval().requires_grad_(False)
    return Encoders(
        prior=ORIGIN,
        decoder=ORIGIN,
        clip_tokenizer=parts.clip_tokenizer,
        clip_text=text,
        clip_vision=vision,
        image_processor=parts.image_processor,
        mclip_tokenizer=parts.mclip_tokenizer,
        mclip=parts.mclip,
        movq=parts.movq,
        device=torch.device("cpu"),
    )


def generic_cache(
    parts: TinyParts, h5_path: str | Path, template: str, clip_image_size: int, resolution: int, work: Path
) -> Path:
    """Extract the generic train file into ``work`` and cache it with the tiny encoders."""
    import pandas as pd

    extract(h5_path, work / "extracted", template, chunk_size=256, workers=0)
    captions = pd.read_parquet(work / "extracted" / "captions.parquet")
    build_cache(
        captions,
        work / "extracted",
        work / "cache",
        tiny_encoders(parts),
        clip_image_size,
        resolution,
        batch_size=64,
        dtype="float32",
        workers=0,
    )
    return work / "cache"


def loop_settings(gen: GeneratorParams) -> LoopSettings:
    """The loop's settings for the pre-training: ``gen``'s, and otherwise the plainest ones
    (no accumulation, EMA or mixed precision; norm clipping at 1 as in params ``train``). No
    validation: ``_train`` hands the loop no ``validate``. Not a ``TrainParams``: this stage
    must not import the training sections' module (train.loop.LoopSettings says why)."""
    return SimpleNamespace(
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        warmup_steps=gen.warmup_steps,
        lr_schedule=gen.lr_schedule,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        mixed_precision="no",
        ema_decay=0.0,
        ema_device="auto",
        ema_every=1,
        optimizer="adamw",
        checkpoint_every=gen.checkpoint_every,
        checkpoints_keep=1,
        log_every=10,
        compile="auto",
        validate_every=0,
    )


def fingerprint(gen: GeneratorParams, seed: int, cache_meta: dict, parts: TinyParts) -> str:
    """What a pre-training checkpoint must share with this run to be resumed: the params, the
    cached data and the encoders' weights (they are trained afresh, deterministically, first)."""
    blob = json.dumps(
        {
            "generator": gen.model_dump(),
            "seed": seed,
            "cache": cache_meta["fingerprint"],
            "encoders": [weights_digest(m) for m in (parts.clip, parts.mclip, parts.movq)],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _train(
    kind: str,
    network,
    scheduler,
    cache_dir: str,
    gen: GeneratorParams,
    seed: int,
    checkpoints: str,
    run_fingerprint: str,
    bar_position: int = 0,
):
    """Train ``network`` (the prior or the U-Net) on the cache with the one loop; return its
    weights and logged curve. Runs in this process or in a pool's (arguments pickle)."""
    torch.set_num_threads(1)
    if mp.parent_process() is not None:  # a pool's fresh process: its global RNGs start from OS
        seed_everything(seed)  # entropy, and Accelerate pickles them into the checkpoints
    if bar_position:  # tqdm reads its defaults from TQDM_* variables: two bars, two lines
        os.environ["TQDM_POSITION"] = str(bar_position)
    cache = open_cache(cache_dir)
    network.requires_grad_(True)
    if kind == "prior":
        task = PriorTask(network, scheduler, cache, gen.cond_dropout)
        epochs = gen.prior_epochs
    else:
        task = DecoderTask(network, scheduler, cache, gen.cond_dropout, gen.cond_dropout)
        epochs = gen.unet_epochs
    task.name = f"pretrain {kind}"
    result = train(
        task,
        loop_settings(gen),
        Schedule(epochs, gen.batch_size, gen.lr, seed),
        Path(checkpoints) / kind,
        run_fingerprint,
    )
    return result.model.state_dict(), result.history


def pretrain_generator(
    parts: TinyParts, cache_dir: Path, gen: GeneratorParams, seed: int, checkpoints: str | Path, pool=None
) -> dict[str, list[dict]]:
    """Train ``parts.prior`` and ``parts.unet`` in place on the cached generic domain; return
    their logged curves (step, epoch, loss, lr). ``pool``: a one-process executor for the
    U-Net (else it trains after the prior, here)."""
    cache = open_cache(cache_dir)
    run = fingerprint(gen, seed, cache.meta, parts)
    with checkpoint_home(checkpoints, run) as home:  # <checkpoints>/<run's fingerprint>/{prior,unet}
        unet_args = ("unet", parts.unet, parts.decoder_scheduler, str(cache_dir), gen, seed, str(home), run)
        job = pool.submit(_train, *unet_args, 1) if pool is not None else None
        prior_state, prior_curve = _train(
            "prior", parts.prior, parts.prior_scheduler, str(cache_dir), gen, seed, str(home), run
        )
        unet_state, unet_curve = job.result() if job is not None else _train(*unet_args)
    parts.prior.load_state_dict(prior_state)
    parts.unet.load_state_dict(unet_state)
    for model in (parts.prior, parts.unet):
        model.eval().requires_grad_(False)
    return {"prior": prior_curve, "unet": unet_curve}
