"""The embed stage: cached arrays equal the encoders on the fly; identity checks; resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fashiondiff.embed.cache import (
    clip_pixels, encode_images, encode_texts, load_encoders, movq_pixels, open_cache,
)
from fashiondiff.errors import PipelineError
from pipeline_fixtures import TINY_SPEC, extracted, run_stage, stage_params, tiny_base, train_cache  # noqa: F401


def test_cache_equals_encoders_on_the_fly(train_cache, tiny_base, extracted):
    cache = open_cache(train_cache)
    captions = pd.read_parquet(extracted / "captions.parquet")
    assert len(cache) == len(captions)
    assert cache.rows.tolist() == captions["row"].tolist()
    enc = load_encoders(str(tiny_base / "prior"), str(tiny_base / "decoder"), device="cpu")
    for pos in (0, 5, len(captions) - 1):
        row = captions.iloc[pos]
        image = Image.open(extracted / row["image"]).convert("RGB")
        want = {
            **encode_texts(enc, [row["caption"]]),
            **encode_images(enc, clip_pixels(enc.image_processor, [image], TINY_SPEC.clip_image_size),
                            torch.from_numpy(movq_pixels(image, 64))[None]),
        }
        for name, value in want.items():
            np.testing.assert_allclose(cache.arrays[name][pos], value[0].numpy(), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} at row {row['row']}")
    assert cache.arrays["latents"].shape[1:] == (4, 8, 8)  # 64 px / MoVQ factor 8, as 2.1
    assert cache.uncond["text_mask"].sum() == 2  # the empty caption: start and end tokens


def test_cache_made_by_another_model_fails_clearly(train_cache, tiny_base):
    meta = json.loads((train_cache / "meta.json").read_text())
    open_cache(train_cache, expect={"prior": meta["prior"], "clip_image_size": meta["clip_image_size"]})
    with pytest.raises(PipelineError, match="prior='other/model'"):
        open_cache(train_cache, expect={"prior": "other/model"})
    with pytest.raises(PipelineError, match="clip_image_size"):
        open_cache(train_cache, expect={"clip_image_size": 224})
    with pytest.raises(PipelineError, match="resolution"):
        open_cache(train_cache, expect={"resolution": 256})


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
    assert progress["done"] == 8  # two batches of 4 finished before the bad row

    victim.write_bytes(good)
    resumed = run_stage(tmp_path, params, "embed.py", broken, "train", tmp_path / "cache")
    assert "resuming" in resumed.stdout
    assert not (tmp_path / ".cache.partial").exists()
    a, b = open_cache(tmp_path / "cache"), open_cache(train_cache)
    for name in a.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


def test_clip_image_size_must_match_the_encoder(tmp_path, tiny_base, extracted):
    params = stage_params(tiny_base, clip_image_size=224)
    result = run_stage(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", check=False)
    assert result.returncode == 1
    assert "clip_image_size 224 does not match" in result.stderr
    assert "Traceback" not in result.stderr
