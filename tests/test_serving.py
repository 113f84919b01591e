"""The serving library in-process, on tiny model folders: request and upload checks, and the
page's backend (base and tuned side by side, a missing folder, LoRA on the base)."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from serving_fixtures import PROMPT, SIDE

from fashiondiff.errors import PipelineError
from fashiondiff.sampling import Sampling
from fashiondiff.serving.engine import Limits, Request, check_request
from fashiondiff.serving.images import b64decode_photo, open_photo, png_base64
from fashiondiff.serving.studio import Side, Studio, find_adapters

FAST = Sampling(steps=2, prior_steps=2, height=SIDE, width=SIDE)


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompt="  "), "empty prompt"),
        (dict(prompt="x" * 1001), "prompt length must be between 1 and 1000"),
        (dict(seed=-1), "seed must be between 0 and"),
        (dict(num_images=5), "num_images must be between 1 and 4"),
        (dict(sampling=replace(FAST, steps=0)), "steps must be between 1 and 1000"),
        (dict(sampling=replace(FAST, guidance_scale=0.5)), "guidance must be between 1.0 and 20.0"),
        (dict(source=Image.new("RGB", (8, 8)), sampling=replace(FAST, strength=1.5)), r"strength must be in \(0, 1\]"),
        (dict(source=Image.new("RGB", (8, 8)), sampling=replace(FAST, strength=0.2)), "leaves no denoising step"),
    ],
)
def test_a_bad_request_is_refused_with_its_reason(change, message):
    good = Request(PROMPT, None, 0, 1, FAST)
    check_request(good, Limits())
    with pytest.raises(PipelineError, match=message):
        check_request(replace(good, **change), Limits())


def test_uploads_are_checked_before_decoding():
    limits = Limits(max_upload_mb=0.01, max_side=100)
    photo = open_photo(png_bytes(40, 30), limits)
    assert photo.mode == "RGB" and photo.size == (40, 30)
    with pytest.raises(PipelineError, match=r"^photo is 101x10 pixels: the limit is 100 per side$"):
        open_photo(png_bytes(101, 10), limits)
    with pytest.raises(PipelineError, match=r"^that upload is not an image \(PNG, JPEG or WebP work\)$"):
        open_photo(b"GIF89a but not really", limits)
    with pytest.raises(PipelineError, match=r"^photo is 0.0191 MB: the limit is 0.01 MB$"):
        open_photo(bytes(20_000), limits)
    with pytest.raises(PipelineError, match="not base64"):
        b64decode_photo("%%%", limits)
    with pytest.raises(PipelineError, match="the limit is 0.01 MB"):
        b64decode_photo("A" * 20_000, limits)
    text = png_base64(photo)
    assert open_photo(b64decode_photo(text, Limits()), Limits()).size == (40, 30)


def test_studio_side_by_side_with_a_missing_folder_and_lora_on_the_base(served, adapters, tmp_path):
    base = Side("base", str(served / "models/base/prior"), str(served / "models/base/decoder"), takes_adapters=True)
    late = tmp_path / "late"
    tuned = Side("tuned", str(late / "prior"), str(late / "decoder"), folder=str(late))
    found = find_adapters([str(adapters)], base.prior, base.decoder)
    assert found == {str(adapters): (None, str(adapters / "decoder/lora"))}
    studio = Studio([base, tuned], found, Limits(), FAST)

    first = studio.generate(PROMPT, None, 0, 2, 4.0, 0.6)  # the tuned folder is not there yet
    assert first.images["tuned"] is None and first.images["base"].size == (SIDE, SIDE)
    assert first.notes == [f"tuned model: {late}: no such model folder (--model: a folder with prior/ and decoder/)"]
    with pytest.raises(PipelineError, match="empty prompt"):
        studio.generate(" ", None, 0, 2, 4.0, 0.6)

    shutil.copytree(served / "models/prior", late / "prior")
    shutil.copytree(served / "models/decoder", late / "decoder")
    photo = served / "photo.png"
    second = studio.generate(PROMPT, str(photo), 0, 2, 4.0, 0.6)  # found now; an edit of the photo
    assert second.notes == [] and second.images["tuned"].size == (SIDE, SIDE)
    plain = pixels(studio.generate(PROMPT, None, 0, 2, 4.0, 0.6).images["base"])
    assert np.array_equal(plain, pixels(first.images["base"]))

    lora = studio.generate(PROMPT, None, 0, 2, 4.0, 0.6, adapter=str(adapters))
    assert lora.labels["base"] == f"base + LoRA {adapters}" and lora.labels["tuned"] == "tuned"
    assert not np.array_equal(pixels(lora.images["base"]), plain)
    again = studio.generate(PROMPT, None, 0, 2, 4.0, 0.6)
    assert np.array_equal(pixels(lora.images["tuned"]), pixels(again.images["tuned"]))
    again = studio.generate(PROMPT, None, 0, 2, 4.0, 0.6)  # adapter taken off again
    assert np.array_equal(pixels(again.images["base"]), plain)
    with pytest.raises(PipelineError, match="no LoRA adapter 'other'"):
        studio.generate(PROMPT, None, 0, 2, 4.0, 0.6, adapter="other")


def test_a_folder_without_adapters_is_an_error_only_when_named(served):
    base = str(served / "models/base/prior"), str(served / "models/base/decoder")
    assert find_adapters([str(served / "models")], *base, required=False) == {}
    with pytest.raises(PipelineError, match="no prior/lora/"):
        find_adapters([str(served / "models")], *base)


def pixels(image) -> np.ndarray:
    return np.asarray(image)
