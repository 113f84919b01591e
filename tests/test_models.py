"""The embedded tiny Kandinsky 2.1: 2.1's very classes, encoders that learn, folders that
load and generate in plain diffusers, and a loader that never downloads."""

from __future__ import annotations

import copy as copy_module
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import replaced
from diffusers import (
    DDIMScheduler,
    KandinskyImg2ImgPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
    PriorTransformer,
    UnCLIPScheduler,
    UNet2DConditionModel,
    VQModel,
)
from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP
from PIL import Image, ImageDraw
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from fashiondiff.config.standin import GeneratorParams, PretrainParams
from fashiondiff.embed.encoders import clip_pixels, movq_pixels
from fashiondiff.errors import PipelineError
from fashiondiff.models.loader import load_decoder, load_prior
from fashiondiff.processes import project_env
from fashiondiff.standin import pretrain as pt
from fashiondiff.standin.tiny import (
    TinySpec,
    build_tiny,
    save_pipelines,
    train_tokenizers,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = TinySpec(clip_image_size=64, clip_patch_size=16)
GENERATOR = GeneratorParams(
    prior_epochs=2,
    unet_epochs=2,
    batch_size=4,
    lr=1e-3,
    warmup_steps=0,
    lr_schedule="cosine",
    cond_dropout=0.1,
    checkpoint_every=4,
)
CONFIG = PretrainParams(
    clip_steps=40,
    movq_steps=30,
    mclip_steps=30,
    batch_size=8,
    movq_batch_size=4,
    lr=2e-3,
    guide_fraction=0.5,
    generator=GENERATOR,
)
RESOLUTION = 32
COLOURS = {"red": (210, 30, 30), "green": (30, 150, 60), "blue": (40, 70, 210), "yellow": (235, 200, 30)}
SHAPES = ("square", "circle", "triangle")


def shape_image(colour: str, shape: str, shift: int) -> np.ndarray:
    """A 64x64 picture of a coloured shape on a light background, moved by ``shift`` pixels."""
    img = Image.new("RGB", (64, 64), (240, 238, 232))
    draw = ImageDraw.Draw(img)
    box = [14 + shift, 14 - shift, 50 + shift, 50 - shift]
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    return np.asarray(img)


def shapes_data() -> tuple[np.ndarray, list[str], list[int]]:
    """12 products (colour x shape), 2 poses each: images, captions, product ids."""
    images, captions, products = [], [], []
    for p, (colour, shape) in enumerate((c, s) for c in COLOURS for s in SHAPES):
        for shift in (-3, 3):
            images.append(shape_image(colour, shape, shift))
            captions.append(f"{colour.capitalize()} {shape}")
            products.append(p)
    return np.stack(images), captions, products


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny model pre-trained for a few steps on the shapes, and its saved folders."""
    images, captions, products = shapes_data()
    torch.manual_seed(0)
    parts = build_tiny(captions, SPEC, seed=0)
    before = pt.reconstruction_error(parts.movq, images, RESOLUTION)
    losses = pt.pretrain_encoders(parts, images, captions, CONFIG, RESOLUTION, seed=0, progress=False).losses
    pt.set_prior_statistics(parts, clip_pixels(parts.image_processor, images))
    out = tmp_path_factory.mktemp("tiny")
    save_pipelines(parts, out)
    return {"parts": parts, "losses": losses, "out": out, "before": before, "data": (images, captions, products)}


def _start_end(curve: list[float], n: int = 5) -> tuple[float, float]:
    return float(np.mean(curve[:n])), float(np.mean(curve[-n:]))


def test_short_pretraining_lowers_every_loss(trained):
    for name in ("clip", "movq", "mclip"):
        start, end = _start_end(trained["losses"][name])
        assert end < 0.8 * start, f"{name} loss {start:.3f} -> {end:.3f}"
    after = pt.reconstruction_error(trained["parts"].movq, trained["data"][0], RESOLUTION)
    assert after["mse"] < 0.5 * trained["before"]["mse"]


def test_clip_learns_the_shapes_and_metrics_report_chance(trained):
    images, captions, products = trained["data"]
    r = pt.retrieval_accuracy(trained["parts"], images, captions, products)
    assert r["candidates"] == 12 and r["top1_chance"] == pytest.approx(1 / 12)
    assert r["top5_chance"] == pytest.approx(5 / 12)
    assert r["top5"] > r["top5_chance"]  # 40 steps: better than chance on its training data


def test_retrieval_ties_count_as_chance_and_identical_captions_as_one_block():
    scores = torch.zeros(3, 4)  # every candidate tied: expected accuracy is exactly chance
    own = torch.eye(3, 4, dtype=torch.bool)
    assert pt._hit_probability(scores, own, 1).tolist() == pytest.approx([0.25] * 3)
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.0]])  # own (0) tied with an identical caption (1)
    assert pt._hit_probability(scores, torch.tensor([[True, False, False, False]]), 1).item() == 0.5
    assert pt._hit_probability(scores, torch.tensor([[True, True, False, False]]), 1).item() == 1.0
    assert pt._chance(4, np.array([2]), 1) == pytest.approx(0.5)


def test_prior_statistics_are_those_of_the_clip_image_embeddings(trained):
    parts = trained["parts"]
    embeds = pt.clip_image_embeds(parts, clip_pixels(parts.image_processor, trained["data"][0]))
    assert (parts.prior.clip_std > 0).all()
    torch.testing.assert_close(parts.prior.clip_mean, embeds.mean(0, keepdim=True))
    torch.testing.assert_close(parts.prior.clip_std, embeds.std(0, keepdim=True).clamp_min(1e-3))


def test_weights_are_safetensors_only(trained):
    out: Path = trained["out"]
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    for folder in (
        "prior/prior",
        "prior/text_encoder",
        "prior/image_encoder",
        "decoder/unet",
        "decoder/text_encoder",
        "decoder/movq",
    ):
        assert list((out / folder).glob("*.safetensors")), folder


def test_folders_are_kandinsky_2_1_in_plain_diffusers(trained):
    out = trained["out"]
    prior = KandinskyPriorPipeline.from_pretrained(out / "prior")
    decoder = KandinskyPipeline.from_pretrained(out / "decoder")
    assert type(prior.text_encoder) is CLIPTextModelWithProjection
    assert type(prior.image_encoder) is CLIPVisionModelWithProjection
    assert type(prior.prior) is PriorTransformer and type(prior.scheduler) is UnCLIPScheduler
    assert type(decoder.text_encoder) is MultilingualCLIP and type(decoder.scheduler) is DDIMScheduler
    assert type(decoder.unet) is UNet2DConditionModel and type(decoder.movq) is VQModel
    unet = decoder.unet.config
    assert (unet.addition_embed_type, unet.encoder_hid_dim_type, unet.out_channels) == (
        "text_image",
        "text_image_proj",
        8,
    )
    assert decoder.movq.config.norm_type == "spatial"
    # the pre-trained weights, not fresh ones, came back
    torch.testing.assert_close(prior.prior.clip_std, trained["parts"].prior.clip_std)


def test_saved_pipelines_generate_text_to_image_and_image_to_image(trained):
    out = trained["out"]
    prior = KandinskyPriorPipeline.from_pretrained(out / "prior")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    emb = prior("Red circle", num_inference_steps=2, generator=gen())
    decoder = KandinskyPipeline.from_pretrained(out / "decoder")
    image = decoder(
        "Red circle",
        image_embeds=emb.image_embeds,
        negative_image_embeds=emb.negative_image_embeds,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=gen(),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    img2img = KandinskyImg2ImgPipeline.from_pretrained(out / "decoder")
    start = Image.fromarray(shape_image("blue", "square", 0))
    image = img2img(
        "Blue square",
        image=start,
        image_embeds=emb.image_embeds,
        negative_image_embeds=emb.negative_image_embeds,
        height=64,
        width=64,
        num_inference_steps=4,
        strength=0.5,
        generator=gen(),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_loader_reads_the_tiny_folders(trained):
    assert type(load_prior(str(trained["out"] / "prior"))) is KandinskyPriorPipeline
    assert type(load_decoder(str(trained["out"] / "decoder"), img2img=True)) is KandinskyImg2ImgPipeline


def test_hub_id_not_in_cache_fails_fast_and_says_how_to_download():
    started = time.perf_counter()
    with pytest.raises(PipelineError, match="hf download fashiondiff-tests/no-such-model") as found:
        load_prior("fashiondiff-tests/no-such-model")
    assert time.perf_counter() - started < 3
    # a params key is named as a params key, a flag as a flag (issue 16)
    assert str(found.value).endswith(
        "(params model.prior); on a connected machine run `hf download "
        "fashiondiff-tests/no-such-model --local-dir models/no-such-model`, "
        "then set model.prior: models/no-such-model in params.yaml"
    )
    with pytest.raises(PipelineError, match=r"\(--prior\);.* then pass --prior models/no-such-model$"):
        load_prior("fashiondiff-tests/no-such-model", "--prior")


def test_pretraining_is_deterministic_from_the_seed():
    images, captions, _ = shapes_data()
    config = replaced(CONFIG, clip_steps=2, movq_steps=2, mclip_steps=2, batch_size=4)
    parts = build_tiny(captions, SPEC, seed=3)
    runs = []
    for copy in (copy_module.deepcopy(parts), copy_module.deepcopy(parts)):
        runs.append(
            (pt.pretrain_encoders(copy, images, captions, config, RESOLUTION, seed=3, progress=False).losses, copy)
        )
    (a, parts_a), (b, parts_b) = runs
    assert a == b
    for name in ("clip", "movq", "mclip"):
        first, second = getattr(parts_a, name).state_dict(), getattr(parts_b, name).state_dict()
        for (key, x), y in zip(first.items(), second.values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=key)


def test_standardised_latents_have_unit_variance_and_decode_the_same():
    """The exact reparametrisation: (z - mean) / std out of the encoder, the inverse folded
    into every consumer of the latents (post_quant_conv, each SpatialNorm): the unquantised
    decode the Kandinsky pipelines use gives the same pixels."""
    images = shapes_data()[0]
    movq = build_tiny(["a b"], SPEC, seed=0).movq.eval()
    x = movq_pixels(images, RESOLUTION)
    with torch.no_grad():
        before = movq.decode(movq.encode(x).latents, force_not_quantize=True).sample
        moments = pt.standardise_latents(movq, x)
        z = movq.encode(x).latents
        after = movq.decode(z, force_not_quantize=True).sample
    assert min(moments["std"]) > 0 and max(abs(m) for m in moments["mean"]) > 0
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.ones(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_case_variants_and_hard_negative_batches():
    assert pt.case_variants(["Black leather mini skirt", "red ball"]) == [
        "Black leather mini skirt",
        "Red ball",
        "black leather mini skirt",
        "red ball",
    ]
    texts = ["red striped mug", "red striped ball", "blue plain kite", "green knit lamp", "red knit lamp"]
    closest = pt._closest_captions(texts)
    assert closest[0].tolist() == [1] and closest[3].tolist() == [4]  # two words in common
    groups = [torch.tensor([2 * i, 2 * i + 1]) for i in range(len(texts))]  # two images per caption
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch = pt._caption_batch(groups, closest, 4, gen)
        captions = (batch // 2).tolist()
        assert len(batch) == 4 and len(set(captions)) == 4  # distinct captions only
        assert captions[1] in closest[captions[0]].tolist()  # the first drawn caption brings its partner


TOKENIZER_FILES = """
import hashlib, sys, tempfile, pathlib
from fashiondiff.standin.tiny import TinySpec, train_tokenizers
captions = sys.stdin.read().splitlines()
digests = []
for tok in train_tokenizers(captions, TinySpec()):
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        digests += [hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(d).iterdir())]
print(" ".join(digests))
"""


@pytest.mark.slow
def test_tokenizer_files_are_identical_across_processes():
    """The `tokenizers` trainers order ties by a per-process hash: ours must not."""
    from fashiondiff.standin.synthetic import _catalogue

    captions = [p.text["input_name"] for p in _catalogue(40, 1, seed=0, first_product_id=0)[0]]
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        run = subprocess.run(
            [sys.executable, "-c", TOKENIZER_FILES],
            input="\n".join(captions),
            text=True,
            capture_output=True,
            env=project_env(PYTHONHASHSEED=hash_seed),
            check=True,
        )
        outputs.add(run.stdout)
    assert len(outputs) == 1, outputs


def test_tokenizers_are_deterministic():
    captions = shapes_data()[1]
    runs = [train_tokenizers(captions, SPEC) for _ in range(3)]
    for clip_tok, xlm_tok in runs[1:]:
        assert clip_tok.get_vocab() == runs[0][0].get_vocab()
        assert xlm_tok.get_vocab() == runs[0][1].get_vocab()
