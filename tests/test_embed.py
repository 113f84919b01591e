"""The embed stage: cached arrays equal the encoders on the fly; identity checks; resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pipeline_fixtures import TINY_SPEC, run_stage, stage_params

from fashiondiff.cache.reader import open_cache
from fashiondiff.embed.encoders import (
    clip_pixels,
    encode_images,
    encode_texts,
    load_encoders,
    movq_pixels,
)
from fashiondiff.errors import PipelineError


def _on_the_fly(enc, extracted, rows) -> dict[str, torch.Tensor]:
    """Format 1's per-image layout: every encoder output of each row, all 77 positions."""
    images = [Image.open(extracted / r["image"]).convert("RGB") for _, r in rows.iterrows()]
    return {
        **encode_texts(enc, rows["caption"].tolist()),
        **encode_images(
            enc, clip_pixels(enc.image_processor, images, TINY_SPEC.clip_image_size), movq_pixels(images, 64)
        ),
    }


def test_cache_equals_encoders_on_the_fly(train_cache, tiny_base, extracted):
    cache = open_cache(train_cache)
    captions = pd.read_parquet(extracted / "captions.parquet")
    assert len(cache) == len(captions)
    assert cache.rows.tolist() == captions["row"].tolist()
    assert cache.meta["captions"] == captions["caption"].nunique() < len(captions)  # stored once each
    enc = load_encoders(str(tiny_base / "prior"), str(tiny_base / "decoder"), device="cpu")
    for pos in (0, 5, len(captions) - 1):
        row = captions.iloc[pos]
        want = _on_the_fly(enc, extracted, captions.iloc[[pos]])
        got = cache.fetch(np.array([pos]))
        length = int(want["text_mask"][0].sum())
        assert got["text_mask"][0].tolist() == want["text_mask"][0].tolist()
        assert not got["text_hidden"][0, length:].any()  # padded back with zeros, masked by the prior
        want["text_hidden"] = want["text_hidden"][:, :length]
        got["text_hidden"] = got["text_hidden"][:, :length]
        for name in sorted(set(got) - {"text_mask"}):
            # batched vs one-image convolutions round differently (oneDNN picks per shape): 1e-4
            np.testing.assert_allclose(
                got[name][0], want[name][0].numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} at row {row['row']}"
            )
    assert cache.arrays["latents"].shape[1:] == (4, 8, 8)  # 64 px / MoVQ factor 8, as 2.1
    assert cache.arrays["text_hidden"].shape[0] == cache.lengths.sum() < 77 * cache.meta["captions"]
    assert cache.arrays["mclip_hidden"].shape[1] == 77  # the U-Net attends to all positions
    assert cache.uncond["text_mask"].sum() == 2  # the empty caption: start and end tokens


def _losses(task, batch, seeds=range(3)) -> list[float]:
    from fashiondiff.train.draws import SampleDraws

    items = np.arange(len(next(iter(batch.values()))))
    with torch.no_grad():
        return [task.loss(task.model, batch, SampleDraws(0, s, items, "cpu")).item() for s in seeds]


def test_losses_from_the_compact_cache_equal_the_per_image_layout(train_cache, tiny_base, extracted):
    """Same batches, same draws: the prior and decoder losses from format 2 equal those from
    format 1's layout (every encoder output per image, CLIP's padded positions included)."""
    from fashiondiff.models.loader import load_decoder, load_prior
    from fashiondiff.train.decoder import DecoderTask
    from fashiondiff.train.prior import PriorTask

    cache = open_cache(train_cache)
    captions = pd.read_parquet(extracted / "captions.parquet")
    enc = load_encoders(str(tiny_base / "prior"), str(tiny_base / "decoder"), device="cpu")
    prior, decoder = load_prior(str(tiny_base / "prior")), load_decoder(str(tiny_base / "decoder"))
    tasks = {
        "prior": PriorTask(prior.prior, prior.scheduler, cache, 0.3),
        "decoder": DecoderTask(decoder.unet, decoder.scheduler, cache, 0.3, 0.3),
    }
    index = np.array([0, 1, 2, 7, 9, 15])  # poses of one product share a caption row
    old = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in _on_the_fly(enc, extracted, captions.iloc[index]).items()
    }
    for name, task in tasks.items():
        task.model.eval()
        new = task.batch(index, torch.device("cpu"))
        np.testing.assert_allclose(_losses(task, new), _losses(task, {k: old[k] for k in new}), rtol=1e-5, err_msg=name)
    # Exactly: the prior masks CLIP's padded positions, so what they hold does not matter.
    task = tasks["prior"]
    new = task.batch(index, torch.device("cpu"))
    full = dict(new, text_hidden=torch.where(new["text_mask"][..., None], new["text_hidden"], old["text_hidden"]))
    assert not torch.equal(full["text_hidden"], new["text_hidden"])
    assert _losses(task, new) == _losses(task, full)


def test_a_format_1_cache_is_refused(tmp_path, train_cache):
    old = tmp_path / "old"
    shutil.copytree(train_cache, old)
    meta = json.loads((old / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(PipelineError, match="cache format 1 .* re-run the embed stage"):
        open_cache(old)


def test_cache_made_by_another_model_fails_clearly(train_cache, tiny_base):
    meta = json.loads((train_cache / "meta.json").read_text())
    open_cache(train_cache, expect={"prior": meta["prior"], "clip_image_size": meta["clip_image_size"]})
    with pytest.raises(PipelineError, match="prior='other/model'"):
        open_cache(train_cache, expect={"prior": "other/model"})
    with pytest.raises(PipelineError, match="clip_image_size"):
        open_cache(train_cache, expect={"clip_image_size": 224})
    with pytest.raises(PipelineError, match="resolution"):
        open_cache(train_cache, expect={"resolution": 256})


@pytest.mark.slow
def test_unreadable_image_fails_then_resumes_to_the_same_cache(tmp_path, tiny_base, extracted, train_cache):
    broken = tmp_path / "extracted"
    shutil.copytree(extracted, broken)
    captions = pd.read_parquet(broken / "captions.parquet")
    victim = broken / captions["image"].iloc[9]
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")
    params = stage_params(tiny_base)
    failed = run_stage(tmp_path, params, "embed.py", broken, "train", tmp_path / "cache", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: {victim}: cannot read image")
    assert not (tmp_path / "cache").exists()
    progress = json.loads((tmp_path / ".cache.partial" / "progress.json").read_text())
    assert progress["images"] == 9  # three batches of 3 finished before the bad row (9)
    assert progress["captions"] == captions["caption"].nunique()  # captions come first

    victim.write_bytes(good)
    resumed = run_stage(tmp_path, params, "embed.py", broken, "train", tmp_path / "cache")
    assert "resuming" in resumed.stdout
    assert not (tmp_path / ".cache.partial").exists()
    a, b = open_cache(tmp_path / "cache"), open_cache(train_cache)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


@pytest.mark.slow
def test_clip_image_size_must_match_the_encoder(tmp_path, tiny_base, extracted):
    params = stage_params(tiny_base, clip_image_size=224)
    result = run_stage(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", check=False)
    assert result.returncode == 1
    assert "clip_image_size 224 does not match" in result.stderr
    assert "Traceback" not in result.stderr
