"""Image + text -> image: the photo is noised at the level training and sampling use, and the
edit keeps what strength says it keeps (real tiny Kandinsky 2.1 pipelines, real diffusers code).

The decoder here has its U-Net's output layer zeroed: it predicts no noise, so DDIM's steps
only rescale, and the edit's final latents are exactly ``sqrt(a_0) * (z + n * sqrt((1 - a_t) /
a_t))`` (z the photo's MoVQ latents, n the drawn noise, a_t the cumulative alpha of the first
timestep run). That makes the noise level the pipeline used measurable to float precision, and
any pipeline that ignores the photo (or noises it at another level) fails.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fashiondiff.evaluate.edits import edit_prompts, recoloured, variant_name, variants
from fashiondiff.sampling import Sampling, as_img2img, image_text_to_image, text_to_image

SIDE = 64
FAST = Sampling(steps=50, prior_steps=2, height=SIDE, width=SIDE, guidance_scale=1.0)
HUB_2_1_SCHEDULER = {  # kandinsky-community/kandinsky-2-1, scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler",
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@pytest.fixture(scope="module")
def pipes(tiny_base):
    from fashiondiff.models.loader import load_decoder, load_prior

    prior, decoder = load_prior(str(tiny_base / "prior")), load_decoder(str(tiny_base / "decoder"))
    with torch.no_grad():
        decoder.unet.conv_out.weight.zero_()  # no predicted noise: DDIM only rescales (module docstring)
        decoder.unet.conv_out.bias.zero_()
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    return prior, decoder


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A garment-like picture: a coloured block on white, some texture."""
    rng = np.random.default_rng(0)
    pixels = np.full((SIDE, SIDE, 3), 245, np.uint8)
    pixels[12:52, 16:48] = (40, 140, 60)
    pixels[12:52, 16:48] += rng.integers(0, 20, (40, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def rmse(a: Image.Image, b: Image.Image) -> float:
    return float(np.sqrt(((pixels(a) - pixels(b)) ** 2).mean()))


def final_latents(decoder, photo, strength: float, seed: int = 0) -> torch.Tensor:
    """The edit's last latents (the pipeline's own callback), from fixed image embeddings."""
    img2img, seen = as_img2img(decoder), []
    dim = decoder.unet.config.cross_attention_dim  # the image embedding (TextImageProjection)
    embeds = torch.ones(1, dim), torch.zeros(1, dim)
    img2img(
        ["a skirt"],
        image=[photo],
        image_embeds=embeds[0],
        negative_image_embeds=embeds[1],
        height=SIDE,
        width=SIDE,
        num_inference_steps=FAST.steps,
        guidance_scale=1.0,
        strength=strength,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda i, t, latents: seen.append(latents),
    )
    return seen[-1]


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.7])
def test_the_photo_is_noised_as_training_noises_and_sampling_denoises(pipes, photo, strength):
    """The noise level the edit starts from is the decoder scheduler's at the first timestep run
    (what `train.decoder` trains with: ``scheduler.add_noise``), not diffusers' stock linear
    0.0001-0.02 one; the stand-in's scheduler is 2.1's."""
    _, decoder = pipes
    scheduler = decoder.scheduler
    assert {k: scheduler.config[k] for k in HUB_2_1_SCHEDULER if k != "_class_name"} == {
        k: v for k, v in HUB_2_1_SCHEDULER.items() if k != "_class_name"
    }
    assert type(scheduler).__name__ == HUB_2_1_SCHEDULER["_class_name"]

    img2img = as_img2img(decoder)
    x = torch.from_numpy(pixels(photo) / 127.5 - 1).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        z = decoder.movq.encode(x).latents
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(0))
    scheduler.set_timesteps(FAST.steps)
    timesteps, _ = img2img.get_timesteps(FAST.steps, strength, "cpu")
    first = int(timesteps[0])
    assert first == (int(FAST.steps * strength) - 1) * (1000 // FAST.steps) + 1  # "leading" spacing, offset 1

    a = scheduler.alphas_cumprod
    expected = a[0].sqrt() * (z + noise * ((1 - a[first]) / a[first]).sqrt())
    got = final_latents(decoder, photo, strength)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    stock = torch.cumprod(1 - torch.linspace(0.0001, 0.02, 1000), 0)[int(1000 * strength) - 2]
    wrong = a[0].sqrt() * (z + noise * ((1 - stock) / stock).sqrt())
    assert (got - wrong).abs().max() > 0.05  # the stock noising would be caught


def test_near_zero_strength_gives_the_photo_back_through_the_movq(pipes, photo):
    prior, decoder = pipes
    x = torch.from_numpy(pixels(photo) / 127.5 - 1).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        rec = decoder.movq.decode(decoder.movq.encode(x).latents, force_not_quantize=True).sample
    rec = Image.fromarray(((rec[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
    edit = image_text_to_image(prior, as_img2img(decoder), ["a skirt"], [photo], [0], replace(FAST, strength=0.02))[0]
    movq_error = rmse(rec, photo)
    assert rmse(edit, photo) <= movq_error + 2.0, (rmse(edit, photo), movq_error)  # 0-255 levels
    # below one denoising step (steps x strength < 1): the photo through the MoVQ, as is
    untouched = image_text_to_image(
        prior, as_img2img(decoder), ["a skirt"], [photo], [0], replace(FAST, strength=0.01)
    )[0]
    assert rmse(untouched, rec) < 1.0


def test_closeness_to_the_photo_falls_as_strength_rises_and_beats_text_alone(pipes, photo):
    prior, decoder = pipes
    img2img = as_img2img(decoder)
    distance = {
        s: rmse(image_text_to_image(prior, img2img, ["a skirt"], [photo], [0], replace(FAST, strength=s))[0], photo)
        for s in (0.1, 0.3, 0.5, 0.7, 0.9)
    }
    text_only = rmse(text_to_image(prior, decoder, ["a skirt"], [0], FAST)[0], photo)
    assert list(distance.values()) == sorted(distance.values()), distance
    assert distance[0.3] < text_only, (distance, text_only)


def test_edit_prompts_change_the_colour_or_take_another_caption():
    assert recoloured("Green sweater") == "Yellow sweater"
    assert recoloured("slim navy wool trousers") == "slim beige wool trousers"
    assert recoloured("a cream dress") == "a black dress"  # wraps around
    assert recoloured("Sweater") is None
    assert edit_prompts(["Green sweater", "Sweater", "Red shorts"]) == ["Yellow sweater", "Red shorts", "Blue shorts"]
    assert edit_prompts(["Sweater"]) == ["Sweater"]


def test_variant_names():
    assert [variant_name(s) for s in (0.3, 0.05, 1.0)] == ["s30", "s05", "s100"]
    assert variants([0.3, 0.5]) == ["s30", "s50", "mix"]
