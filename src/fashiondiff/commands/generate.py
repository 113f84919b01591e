"""Generate images with Kandinsky 2.1: from text, from a photo and text, or from a weighted mix.

Usage::

    fashiondiff generate "black leather mini skirt" --model models --out skirt.png
    fashiondiff generate "black leather mini skirt" --model models/base --out base.png
    fashiondiff generate "black leather mini skirt" --model models/base --lora models --out lora.png
    fashiondiff generate "black leather mini skirt" --image shirt.png --strength 0.3 --out edit.png
    fashiondiff generate "a dress" --mix "red silk:0.3" --mix shirt.png:0.3 --prompt-weight 0.4 --out mix.png
    fashiondiff generate "a dress" --prior kandinsky-community/kandinsky-2-1-prior \\
        --decoder kandinsky-community/kandinsky-2-1 --num-images 4 --out samples/

Sampling defaults come from ./params.yaml when it exists (diffusion_steps, evaluate.*,
model.resolution), else 100 decoder steps, 25 prior steps, guidance 4, 512x512 (2.1's
native size). Image ``k`` of ``--num-images`` uses seed ``--seed + k``, so any one image
can be made again alone. With ``--image``, each output ``X.png`` comes with ``X.beside.png``:
the photo beside the edit. ``--strength`` (default 0.3) is how much of the photo's noise
schedule is redone: near 0 the photo comes back (through the MoVQ), 1 ignores it (measured
trade-off: docs/generating.md). ``--lora DIR`` applies LoRA adapters (DIR/prior/lora,
DIR/decoder/lora, as training writes them) to the base model without a merged copy.
Kandinsky 2.1 rounds sizes up to a multiple of 64 (MoVQ's 8x downsampling squared), the
tiny model too. The sampling itself is ``fashiondiff.sampling``'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from fashiondiff.errors import PipelineError
from fashiondiff.models.select import resolve_adapters, resolve_models
from fashiondiff.sampling import (
    Sampling,
    apply_adapters,
    as_img2img,
    check_prompt,
    check_strength,
    decode,
    generators,
    image_embeds,
    mixed_embeds,
    quiet_libraries,
    sampling_from_params,
)
from fashiondiff.serving.images import read_image

CLI_HELP = __doc__.split(" The sampling itself")[0].replace("Usage::", "Examples:").replace("``", "")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# --- the command -------------------------------------------------------------------------------


def parse_mix(items: Sequence[str]) -> tuple[list, list[float]]:
    """``TEXT_OR_IMAGE:WEIGHT`` items -> (conditions, weights); image files are opened."""
    conditions, weights = [], []
    for item in items:
        cond, sep, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not sep or not cond.strip() or value is None:
            raise PipelineError(f"--mix {item!r}: expected TEXT_OR_IMAGE:WEIGHT, e.g. 'red silk dress:0.3'")
        is_image = Path(cond).suffix.lower() in IMAGE_SUFFIXES or Path(cond).is_file()
        conditions.append(read_image(cond, "--mix") if is_image else cond)
        weights.append(value)
    return conditions, weights


def output_paths(out: str | Path, seeds: Sequence[int]) -> list[Path]:
    """``out`` is one .png file (one image) or a folder (``seed-<seed>.png`` per image)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if len(seeds) > 1:
            raise PipelineError(f"--out {out} names one file; give a folder for --num-images {len(seeds)}")
        return [out]
    if out.suffix:
        raise PipelineError(f"--out {out}: images are written as PNG; give a .png file or a folder")
    return [out / f"seed-{s}.png" for s in seeds]


def check_sampling(sampling: Sampling, img2img: bool) -> None:
    """One-line errors for settings the pipelines would reject with a traceback."""
    for name, value in (
        ("--steps", sampling.steps),
        ("--prior-steps", sampling.prior_steps),
        ("--height", sampling.height),
        ("--width", sampling.width),
    ):
        if value < 1:
            raise PipelineError(f"{name} must be >= 1, got {value}")
    check_strength(sampling, img2img, flag="--")


def generate(
    prompt: str,
    prior: str,
    decoder: str,
    out: str | Path,
    *,
    source: str | None = None,
    mix: Sequence[str] = (),
    prompt_weight: float = 1.0,
    seed: int = 0,
    num_images: int = 1,
    sampling: Sampling = Sampling(),
    device: str | None = None,
    lora: str | None = None,
    prior_lora: str | None = None,
    decoder_lora: str | None = None,
    quiet: bool = False,
) -> list[Path]:
    """Generate ``num_images`` images and write them as PNG; return their paths.

    ``lora``/``prior_lora``/``decoder_lora``: adapters applied to the loaded models
    (see :func:`resolve_adapters`).

    Checks every input (prompt, models, images, output) before loading a model;
    ``quiet`` silences the libraries' loading bars and warnings (the CLI sets it).
    """
    check_prompt(prompt)
    if num_images < 1:
        raise PipelineError(f"--num-images must be >= 1, got {num_images}")
    check_sampling(sampling, img2img=bool(source))
    prior_name, decoder_name = resolve_models(None, prior, decoder)
    prior_lora, decoder_lora = resolve_adapters(lora, prior_lora, decoder_lora, prior_name, decoder_name)
    source_image = read_image(source) if source else None
    conditions, weights = parse_mix(mix)
    seeds = [seed + k for k in range(num_images)]
    paths = output_paths(out, seeds)

    if quiet:
        quiet_libraries()
    from fashiondiff.io import atomic_file
    from fashiondiff.models.loader import load_decoder, load_prior
    from fashiondiff.runtime import default_device

    device = device or default_device()
    prior_pipe = load_prior(prior_name, "--prior").to(device)
    decoder_pipe = load_decoder(decoder_name, "--decoder").to(device)
    apply_adapters(prior_pipe, decoder_pipe, prior_lora, decoder_lora)
    if source_image is not None:
        decoder_pipe = as_img2img(decoder_pipe)  # the source noised as the decoder's scheduler says
    for path, s in zip(paths, seeds):
        gens = generators([s])
        if conditions:
            embeds = mixed_embeds(prior_pipe, [prompt, *conditions], [prompt_weight, *weights], gens[0], sampling)
        else:
            embeds = image_embeds(prior_pipe, [prompt], gens, sampling)
        sources = [source_image] if source_image is not None else None
        (image,) = decode(decoder_pipe, [prompt], embeds, gens, sampling, sources=sources)
        with atomic_file(path, "wb") as handle:
            image.save(handle, format="PNG")
        if source_image is not None:
            with atomic_file(beside_path(path), "wb") as handle:
                beside(source_image, image, prompt, sampling.strength, s).save(handle, format="PNG")
    return paths


def beside_path(path: Path) -> Path:
    """``edit.png`` -> ``edit.beside.png``: the photo beside the edit."""
    return path.with_name(f"{path.stem}.beside.png")


def beside(source, image, prompt: str, strength: float, seed: int):
    """The photo (at the result's size) beside the edit, the prompt and settings above."""
    from fashiondiff.evaluate.figures import image_text_figure

    photo = source.convert("RGB").resize(image.size)
    return image_text_figure(prompt, photo, {f"strength {strength:g}": image}, subtitle=f"seed {seed}")


def add_parser(subparsers) -> None:
    """Register ``generate`` on the top-level CLI."""
    p = subparsers.add_parser(
        "generate",
        help="text (or image + text, or a mix) -> image",
        description=CLI_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", help='what to generate, e.g. "black leather mini skirt"')
    p.add_argument(
        "--model", default="models", help="folder holding prior/ and decoder/ (tuned: models, base: models/base)"
    )
    p.add_argument("--prior", help="prior folder or Hub id (overrides --model)")
    p.add_argument("--decoder", help="decoder folder or Hub id (overrides --model)")
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="apply the LoRA adapters DIR/prior/lora and/or DIR/decoder/lora (training's "
        "--out folders' parent, e.g. models) to the base model: use with --model models/base",
    )
    p.add_argument("--prior-lora", metavar="DIR", help="a prior adapter folder (overrides --lora's)")
    p.add_argument("--decoder-lora", metavar="DIR", help="a decoder adapter folder (overrides --lora's)")
    p.add_argument("--image", help="source image: image + text -> image (img2img)")
    p.add_argument(
        "--strength", type=float, help=f"img2img: how far from the source to go, (0, 1] (default {Sampling.strength})"
    )
    p.add_argument(
        "--mix",
        action="append",
        default=[],
        metavar="TEXT_OR_IMAGE:WEIGHT",
        help="add a weighted condition (repeatable); the prompt takes --prompt-weight",
    )
    p.add_argument("--prompt-weight", type=float, default=1.0, help="the prompt's weight in a --mix")
    p.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default 0)")
    p.add_argument("--steps", type=int, help="decoder steps (default: params diffusion_steps, else 100)")
    p.add_argument("--guidance", type=float, help="decoder guidance (default: params, else 4)")
    p.add_argument("--prior-steps", type=int, help="prior steps (default: params, else 25)")
    p.add_argument("--prior-guidance", type=float, help="prior guidance (default: params, else 4)")
    p.add_argument("--height", type=int, help="pixels (default: params model.resolution, else 512)")
    p.add_argument("--width", type=int, help="pixels (default: params model.resolution, else 512)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default 1)")
    p.add_argument("--out", default="generated.png", help="a .png file, or a folder for several images")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--params", default="params.yaml", help="defaults come from here if it exists")
    p.set_defaults(func=run)


def defaults(params_path: str | Path) -> Sampling:
    """Sampling defaults from params.yaml when it exists, else 2.1's usual settings."""
    if not Path(params_path).is_file():
        return Sampling()
    from fashiondiff.config.whole import load_params

    return sampling_from_params(load_params(params_path))


def run(args: argparse.Namespace) -> None:
    """``generate`` subcommand: validate, quiet the libraries, generate, print the paths."""
    check_prompt(args.prompt)
    prior, decoder = resolve_models(args.model, args.prior, args.decoder)
    base = defaults(args.params)
    chosen = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "prior_steps": args.prior_steps,
        "prior_guidance_scale": args.prior_guidance,
        "height": args.height,
        "width": args.width,
        "strength": args.strength,
    }
    sampling = Sampling(**{k: (v if v is not None else getattr(base, k)) for k, v in chosen.items()})
    paths = generate(
        args.prompt,
        prior,
        decoder,
        args.out,
        source=args.image,
        mix=args.mix,
        prompt_weight=args.prompt_weight,
        seed=args.seed,
        num_images=args.num_images,
        sampling=sampling,
        device=args.device,
        lora=args.lora,
        prior_lora=args.prior_lora,
        decoder_lora=args.decoder_lora,
        quiet=True,
    )
    for path in paths:
        print(path)
        if args.image:
            print(beside_path(path))
