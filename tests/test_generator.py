"""The stand-in's generator pre-training: the project's own extract, cache and loop on the
generic domain; the U-Net in a second process gives exactly what it gives in this one."""

from __future__ import annotations

import copy
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from conftest import replaced

from fashiondiff.cache.reader import open_cache
from fashiondiff.config.standin import GeneratorParams, PretrainParams
from fashiondiff.data.fashiongen import read_rows
from fashiondiff.embed.encoders import clip_pixels
from fashiondiff.standin import generator as gen
from fashiondiff.standin import pretrain as pt
from fashiondiff.standin.synthetic import GENERIC, write_synthetic
from fashiondiff.standin.tiny import TinySpec, build_tiny
from fashiondiff.train.loop import weights_digest

SPEC = TinySpec(clip_image_size=64, clip_patch_size=16)
GENERATOR = GeneratorParams(
    prior_epochs=3,
    unet_epochs=3,
    batch_size=4,
    lr=2e-3,
    warmup_steps=0,
    lr_schedule="cosine",
    cond_dropout=0.1,
    checkpoint_every=4,
)
CONFIG = PretrainParams(
    clip_steps=4,
    movq_steps=4,
    mclip_steps=4,
    batch_size=4,
    movq_batch_size=2,
    lr=1e-3,
    guide_fraction=0.5,
    generator=GENERATOR,
)
RESOLUTION = 64


@pytest.fixture(scope="module")
def encoders_and_cache(tmp_path_factory):
    """A tiny model whose encoders saw a few steps of a small generic file, and its cache."""
    root = tmp_path_factory.mktemp("generator")
    h5 = write_synthetic(root / "generic_train.h5", 6, 2, seed=5, domain=GENERIC)
    rows = read_rows(h5, 0, 100)
    captions = rows.text["name"]
    parts = build_tiny(pt.case_variants(captions), SPEC, seed=0)
    pt.pretrain_encoders(parts, rows.images, captions, CONFIG, RESOLUTION, seed=0, progress=False)
    pt.set_prior_statistics(parts, clip_pixels(parts.image_processor, rows.images))
    cache = gen.generic_cache(parts, h5, "{name}", SPEC.clip_image_size, RESOLUTION, root / "work")
    return parts, cache, root


def test_the_cache_is_the_embed_stages_made_by_the_tiny_encoders(encoders_and_cache):
    parts, cache_dir, _ = encoders_and_cache
    cache = open_cache(cache_dir)
    assert len(cache) == 12 and cache.meta["prior"] == gen.ORIGIN
    assert cache.arrays["latents"].shape[1:] == (4, RESOLUTION // 8, RESOLUTION // 8)
    z = torch.from_numpy(np.array(cache.arrays["latents"]))
    assert abs(z.mean().item()) < 0.5 and 0.5 < z.std().item() < 2  # standardised MoVQ latents


@pytest.mark.slow
def test_prior_and_unet_learn_and_a_second_process_gives_the_same_weights(encoders_and_cache, tmp_path):
    parts, cache, _ = encoders_and_cache
    here, there = copy.deepcopy(parts), copy.deepcopy(parts)
    before = {k: weights_digest(getattr(parts, k)) for k in ("prior", "unet")}
    curves = gen.pretrain_generator(here, cache, GENERATOR, seed=0, checkpoints=tmp_path / "a")
    for kind, curve in curves.items():
        assert curve[-1]["step"] == 3 * 3  # 12 images / batch 4 x 3 epochs
        assert weights_digest(getattr(here, "prior" if kind == "prior" else "unet")) != before[kind]
    again = copy.deepcopy(parts)
    for model, folder in ((there, "b"), (again, "c")):  # a fresh pool process each time
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            gen.pretrain_generator(model, cache, GENERATOR, seed=0, checkpoints=tmp_path / folder, pool=pool)
    for kind in ("prior", "unet"):
        assert weights_digest(getattr(here, kind)) == weights_digest(getattr(there, kind)), kind
    # the checkpoints are a DVC output: byte-identical, the RNG states Accelerate pickles included
    files = {f.relative_to(tmp_path / "b"): f.read_bytes() for f in sorted((tmp_path / "b").rglob("*")) if f.is_file()}
    assert any(f.name.startswith("random_states") for f in files)
    for name, data in files.items():
        assert (tmp_path / "c" / name).read_bytes() == data, name
    assert not any(p.requires_grad for p in here.unet.parameters())


def test_a_finished_pretraining_resumes_from_its_checkpoint_and_other_params_train_apart(
    encoders_and_cache, tmp_path, capsys
):
    parts, cache, _ = encoders_and_cache
    first = copy.deepcopy(parts)
    gen.pretrain_generator(first, cache, GENERATOR, seed=0, checkpoints=tmp_path)
    again = copy.deepcopy(parts)
    gen.pretrain_generator(again, cache, GENERATOR, seed=0, checkpoints=tmp_path)
    assert "resumed from step 9 of 9" in capsys.readouterr().out
    assert weights_digest(again.unet) == weights_digest(first.unet)
    first_home = [p for p in tmp_path.iterdir() if p.is_dir()]
    other = replaced(GENERATOR, lr=1e-3)  # a folder of its own; finished, it prunes the first run's
    gen.pretrain_generator(copy.deepcopy(parts), cache, other, seed=0, checkpoints=tmp_path)
    assert "resumed" not in capsys.readouterr().out
    homes = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(first_home) == len(homes) == 1 and homes != first_home
