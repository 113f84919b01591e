"""Teach the embedded tiny Kandinsky 2.1's encoders to see, in CPU minutes.

A random-init CLIP, MoVQ and MultilingualCLIP mean nothing. Here, on the train splits of
both synthetic domains (the catalogue and the generic one: like the real encoders, which
saw the whole web, they know garments too):

1. the CLIP towers learn captions <-> pictures (CLIP's symmetric InfoNCE);
2. the MoVQ learns to autoencode at the decoder resolution, through the path the
   Kandinsky pipelines use: ``decode(encode(x).latents, force_not_quantize=True)``;
3. the MultilingualCLIP text tower is distilled towards the frozen CLIP text
   embedding, as the real M-CLIP was distilled from CLIP (Carlsson et al., 2022), on
   each caption as written, lowercased and capitalised (:func:`case_variants`);
4. the prior's ``clip_mean``/``clip_std`` become the statistics of the CLIP image
   embeddings of what the prior is trained on (:func:`set_prior_statistics`).

The prior and the U-Net are then pre-trained on the generic domain alone
(``fashiondiff.standin.generator``): the base never sees a garment's shape. Usage::

    parts = build_tiny(captions, TinySpec(clip_image_size=224), seed=0)
    result = pretrain_encoders(parts, images, captions, params.standin.pretrain, resolution=64,
                               seed=0, pool=pool)
    set_prior_statistics(parts, clip_pixels(parts.image_processor, generic_images))
    retrieval_accuracy(parts, val_images, val_captions, val_product_ids)
    reconstruction_error(parts.movq, val_images, resolution=64)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from fashiondiff.cache.format import TEXT_LENGTH
from fashiondiff.config.standin import PretrainParams
from fashiondiff.embed.encoders import clip_pixels, movq_pixels
from fashiondiff.standin.tiny import TinyParts

# --- inputs, prepared once (pixels: fashiondiff.embed.encoders) ----------------------


def tokenize(tokenizer, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask, padded to 77 tokens as both 2.1 pipelines do."""
    tok = tokenizer(list(captions), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


# --- the whole recipe ----------------------------------------------------------------


@dataclass
class PretrainResult:
    losses: dict[str, list[float]]  # per-step loss curve of each part
    seconds: dict[str, float]  # wall time of each part
    latent_moments: dict[str, list[float]] = None  # the MoVQ latents' mean/std before standardising


def pretrain_encoders(
    parts: TinyParts,
    images: np.ndarray,
    captions: Sequence[str],
    cfg: PretrainParams,
    resolution: int,
    seed: int,
    progress: bool = True,
    pool=None,
) -> PretrainResult:
    """Pre-train CLIP, MoVQ and MultilingualCLIP in place.

    ``images`` are (N, H, W, 3) uint8 with one caption each. ``pool``: a one-process
    executor that trains the MoVQ (one thread, the project's CPU rule) while CLIP and then
    M-CLIP train here; the result is the same as in one process.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    result = PretrainResult({}, {})
    started = time.perf_counter()
    pixels, small = clip_pixels(parts.image_processor, images), movq_pixels(images, resolution)
    result.seconds["prepare"] = round(time.perf_counter() - started, 1)
    if pool is not None:
        movq_job = pool.submit(_timed, train_movq, parts.movq, small, cfg, seed, progress, 1)
    result.losses["clip"], result.seconds["clip"] = _timed(train_clip, parts, pixels, captions, cfg, seed, progress)
    result.losses["mclip"], result.seconds["mclip"] = _timed(
        distill_mclip, parts, case_variants(captions), cfg, seed, progress
    )
    if pool is not None:
        (state, result.losses["movq"]), result.seconds["movq"] = movq_job.result()
        parts.movq.load_state_dict(state)
    else:
        (_, result.losses["movq"]), result.seconds["movq"] = _timed(train_movq, parts.movq, small, cfg, seed, progress)
    for model in (parts.clip, parts.movq, parts.mclip):
        model.eval().requires_grad_(False)
    result.latent_moments = standardise_latents(parts.movq, small)
    return result


def case_variants(captions: Sequence[str]) -> list[str]:
    """Each caption as written, in lowercase and capitalised: people type "black leather mini
    skirt" where the catalogue says "Black leather mini skirt". CLIP's tokenizer lowercases,
    XLM-R's does not, so M-CLIP learns the variants' common CLIP embedding."""
    return sorted({v for c in captions for v in (c, c.lower(), c[:1].upper() + c[1:])})


def _timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, round(time.perf_counter() - started, 1)


def _generator(seed: int, part: str) -> torch.Generator:
    """One random stream per part, so the parts can train in any order or process; the global
    RNG (dropout: XLM-R has some) is reseeded with it."""
    state = np.random.SeedSequence([seed, ("clip", "movq", "mclip").index(part)]).generate_state(1)
    torch.manual_seed(int(state[0]))
    return torch.Generator().manual_seed(int(state[0]))


def _optimiser(params, lr: float, steps: int):
    """AdamW, a short linear warm-up, then a cosine decay to 1%: in a few hundred steps much of
    the gain comes as the rate anneals (MoVQ validation PSNR: 19.1 -> 21.9 dB over the last
    300 of 800 steps)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, min(20, steps // 10))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loop(name: str, steps: int, loss_fn, params, lr: float, progress: bool, position: int = 0) -> list[float]:
    """The one tiny training loop of this module: ``loss_fn()`` returns a scalar per step."""
    opt, sched = _optimiser(params, lr, steps)
    curve = []
    bar = tqdm(range(steps), desc=f"pretrain {name}", disable=not progress, position=position)
    for _ in bar:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{curve[-1]:.4f}")
    return curve


# --- 1. CLIP -----------------------------------------------------------------------------


def _closest_captions(texts: Sequence[str]) -> list[torch.Tensor]:
    """For each caption, the other captions sharing the most words with it (lowercased): its
    hard negatives. "red striped mug" -> "red striped ball", "red striped t-shirt", ..."""
    words = [set(t.lower().split()) for t in texts]
    out = []
    for i, mine in enumerate(words):
        overlap = torch.tensor([len(mine & other) if j != i else -1 for j, other in enumerate(words)])
        out.append(torch.nonzero(overlap == overlap.max()).flatten())
    return out


def _caption_batch(
    groups: list[torch.Tensor], closest: list[torch.Tensor], size: int, gen: torch.Generator
) -> torch.Tensor:
    """One random image for each of ``size`` distinct captions: half drawn at random, and for
    each of those one of its closest captions (see :func:`_closest_captions`).

    InfoNCE needs no duplicate caption in a batch (the poses of a product share one), or its
    positives become negatives. And it needs hard negatives: with random captions alone, a
    batch of 32 rarely holds two with the same colour and material, so colour and material
    retrieve the caption and the image embedding never learns the object's shape (measured:
    nearest-neighbour images shared their kind at chance level, 0.09), which is what the
    decoder must draw from it.
    """
    order = torch.randperm(len(groups), generator=gen).tolist()
    chosen: list[int] = []
    taken: set[int] = set()
    for anchor in order:
        if len(chosen) >= size:
            break
        if anchor in taken:
            continue
        chosen.append(anchor)
        taken.add(anchor)
        partners = [int(j) for j in closest[anchor] if int(j) not in taken]
        if partners and len(chosen) < size:
            pick = partners[int(torch.randint(len(partners), (1,), generator=gen))]
            chosen.append(pick)
            taken.add(pick)
    return torch.stack([groups[g][torch.randint(len(groups[g]), (1,), generator=gen)[0]] for g in chosen])


def _augment(pixels: torch.Tensor, gen: torch.Generator, shift: float = 0.06) -> torch.Tensor:
    """Random horizontal flip and translation (edge-replicated) per image."""
    n, _, h, w = pixels.shape
    pad = max(1, int(shift * h))
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="replicate")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist()
    out = torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])
    flip_idx = [i for i, f in enumerate(flips) if f]
    out[flip_idx] = out[flip_idx].flip(-1)
    return out


def train_clip(
    parts: TinyParts,
    pixels: torch.Tensor,
    captions: Sequence[str],
    cfg: PretrainParams,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Contrastive training of ``parts.clip`` on (pixel values, caption) pairs."""
    gen = _generator(seed, "clip")
    clip = parts.clip.train().requires_grad_(True)
    texts = sorted(set(captions))
    ids, mask = tokenize(parts.clip_tokenizer, texts)
    where = {t: i for i, t in enumerate(texts)}
    rows = torch.tensor([where[c] for c in captions])
    groups = [torch.nonzero(rows == i).flatten() for i in range(len(texts))]
    closest = _closest_captions(texts)
    size = min(cfg.batch_size, len(texts))

    def loss_fn():
        idx = _caption_batch(groups, closest, size, gen)
        t = rows[idx]
        out = clip(input_ids=ids[t], attention_mask=mask[t], pixel_values=_augment(pixels[idx], gen), return_loss=True)
        return out.loss

    return _loop("clip", cfg.clip_steps, loss_fn, list(clip.parameters()), cfg.lr, progress)


# --- 2. MoVQ -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CellColours:
    """Mean and std of the training pixels' colours averaged over one latent cell: the
    standardised target of the colour guide in :func:`movq_loss`."""

    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor

    @classmethod
    def of(cls, pixels: torch.Tensor, cell: int) -> CellColours:
        blocks = F.avg_pool2d(pixels, cell)
        return cls(blocks.mean((0, 2, 3), keepdim=True), blocks.std((0, 2, 3), keepdim=True))


def movq_loss(
    movq, x: torch.Tensor, colours: CellColours | None = None, guide_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, RGB reconstruction MSE) of ``movq`` on ``x`` in [-1, 1].

    Reconstruction (L1 + L2) goes through the unquantised path the Kandinsky pipelines
    decode with; the quantiser still gets its codebook + commitment loss (what
    ``VQModel.forward`` returns). ``guide_weight`` pulls the first three latent channels
    towards the standardised colours of their cell (``colours``), which hands the decoder
    a colour path early on (annealed to 0 by the caller). The latents' scale is left free
    (:func:`standardise_latents` fixes it exactly afterwards). Measured on both synthetic
    domains (400 steps of 4 images, validation PSNR / 8x8-cell colour MSE x1e3): plain L1 + L2
    19.1 dB / 2.3; with the colour axes whitened and a penalty pulling the latents to unit
    variance (an earlier design) 17.3 dB / 4.6.
    """
    z = movq.encode(x).latents
    rec = movq.decode(z, force_not_quantize=True).sample
    _, commit, _ = movq.quantize(z)
    err = rec - x
    loss = err.abs().mean() + err.pow(2).mean() + commit
    if guide_weight > 0 and colours is not None:
        target = (F.adaptive_avg_pool2d(x, z.shape[-2:]) - colours.mean) / colours.std
        loss = loss + guide_weight * F.mse_loss(z[:, :3], target)
    return loss, F.mse_loss(rec.detach(), x)


def train_movq(
    movq, pixels: torch.Tensor, cfg: PretrainParams, seed: int, progress: bool = True, position: int = 0
) -> tuple[dict, list[float]]:
    """Autoencoder training of the MoVQ on (N, 3, R, R) pixels in [-1, 1], in place.

    Returns the trained weights (a state dict, for a caller in another process) and the losses.
    """
    gen = _generator(seed, "movq")
    movq.train().requires_grad_(True)
    size = min(cfg.movq_batch_size, len(pixels))
    cell = 2 ** (len(movq.config.block_out_channels) - 1)  # pixels per latent cell
    colours = CellColours.of(pixels, cell)
    step = 0

    def loss_fn():
        nonlocal step
        idx = torch.randperm(len(pixels), generator=gen)[:size]
        x = pixels[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        guide = max(0.0, 1.0 - step / (cfg.guide_fraction * cfg.movq_steps)) if cfg.guide_fraction else 0.0
        step += 1
        return movq_loss(movq, x, colours, guide)[0]

    curve = _loop("movq", cfg.movq_steps, loss_fn, list(movq.parameters()), cfg.lr, progress, position)
    return movq.state_dict(), curve


@torch.no_grad()
def standardise_latents(movq, pixels: torch.Tensor, chunk: int = 64) -> dict[str, list[float]]:
    """Reparametrise ``movq`` in place so that its latents of ``pixels`` have zero mean and unit
    variance per channel, exactly: Kandinsky 2.1 diffuses MoVQ latents as they are (no scaling
    factor) with a noise schedule made for data of about unit variance.

    The encoder's last 1x1 convolution (``quant_conv``) maps to ``(z - mean) / std``; every
    consumer of the latents -- ``post_quant_conv`` and each SpatialNorm's ``conv_y`` and
    ``conv_b``, all 1x1 convolutions -- absorbs the inverse map, so the unquantised decode
    (``force_not_quantize=True``, the only one the Kandinsky pipelines use) gives the same
    pixels as before. The codebook moves along; its nearest-code search is not preserved
    (the scales differ per channel), which no pipeline uses. Returns the removed statistics.
    """
    from diffusers.models.attention_processor import SpatialNorm

    movq.eval()
    z = torch.cat([movq.encode(pixels[i : i + chunk]).latents for i in range(0, len(pixels), chunk)])
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3)).clamp_min(1e-6)
    enc = movq.quant_conv
    enc.weight.div_(std[:, None, None, None])
    enc.bias.sub_(mean).div_(std)
    consumers = [movq.post_quant_conv] + [
        conv for m in movq.modules() if isinstance(m, SpatialNorm) for conv in (m.conv_y, m.conv_b)
    ]
    for conv in consumers:  # W z + b = (W * std) z' + (W mean + b)
        conv.bias.add_(conv.weight[:, :, 0, 0] @ mean)
        conv.weight.mul_(std[None, :, None, None])
    codebook = movq.quantize.embedding.weight
    codebook.sub_(mean).div_(std)
    return {"mean": mean.tolist(), "std": std.tolist()}


# --- 3. MultilingualCLIP ------------------------------------------------------------------


@torch.no_grad()
def clip_text_embeds(parts: TinyParts, captions: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """CLIP ``text_embeds`` (projected, unnormalised), as CLIPTextModelWithProjection gives them."""
    ids, mask = tokenize(parts.clip_tokenizer, captions)
    return torch.cat(
        [
            parts.clip.get_text_features(input_ids=ids[i : i + chunk], attention_mask=mask[i : i + chunk]).pooler_output
            for i in range(0, len(ids), chunk)
        ]
    )


@torch.no_grad()
def clip_image_embeds(parts: TinyParts, pixels: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """CLIP ``image_embeds`` (projected, unnormalised), as CLIPVisionModelWithProjection gives them."""
    return torch.cat(
        [
            parts.clip.get_image_features(pixel_values=pixels[i : i + chunk]).pooler_output
            for i in range(0, len(pixels), chunk)
        ]
    )


def distill_mclip(
    parts: TinyParts, captions: Sequence[str], cfg: PretrainParams, seed: int, progress: bool = True
) -> list[float]:
    """Regress the MultilingualCLIP embedding onto the frozen CLIP text embedding (MSE + cosine)."""
    gen = _generator(seed, "mclip")
    parts.clip.eval()
    texts = sorted(set(captions))
    target = clip_text_embeds(parts, texts)
    ids, mask = tokenize(parts.mclip_tokenizer, texts)
    mclip = parts.mclip.train().requires_grad_(True)
    size = min(cfg.batch_size, len(texts))

    def loss_fn():
        idx = torch.randperm(len(texts), generator=gen)[:size]
        pred, _ = mclip(input_ids=ids[idx], attention_mask=mask[idx])
        t = target[idx]
        return F.mse_loss(pred, t) + (1 - F.cosine_similarity(pred, t, dim=-1)).mean()

    return _loop("mclip", cfg.mclip_steps, loss_fn, list(mclip.parameters()), cfg.lr, progress)


# --- 4. the prior's statistics -------------------------------------------------------------


@torch.no_grad()
def set_prior_statistics(parts: TinyParts, pixels: torch.Tensor, min_std: float = 1e-3) -> None:
    """``prior.clip_mean``/``clip_std`` := per-dimension mean/std of the CLIP image embeddings;
    the prior denoises in this standardised space (``post_process_latents``)."""
    parts.clip.eval()
    embeds = clip_image_embeds(parts, pixels)
    parts.prior.clip_mean.copy_(embeds.mean(0, keepdim=True))
    parts.prior.clip_std.copy_(embeds.std(0, keepdim=True).clamp_min(min_std))


# --- quality on held-out data ---------------------------------------------------------------


def _hit_probability(scores: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """P(own candidate in the top ``k``) per row, ties broken uniformly at random.

    ``own`` is a boolean (rows, candidates) mask of the candidates that count as correct;
    identical captions have identical scores, so they form one tied block.
    """
    own_score = torch.where(own, scores, torch.full_like(scores, -torch.inf)).max(1, keepdim=True).values
    others = ~own
    greater = ((scores > own_score) & others).sum(1).float()
    tied = ((scores == own_score) & others).sum(1).float()
    return ((k - greater) / (tied + 1)).clamp(0, 1)


def _chance(n_candidates: int, n_correct: np.ndarray, k: int) -> float:
    """P(at least one of ``n_correct`` candidates in ``k`` random picks of ``n_candidates``)."""
    k = min(k, n_candidates)
    miss = [math.comb(n_candidates - m, k) / math.comb(n_candidates, k) for m in n_correct]
    return float(1 - np.mean(miss))


@torch.no_grad()
def retrieval_accuracy(
    parts: TinyParts,
    images: np.ndarray,
    captions: Sequence[str],
    product_ids: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Image -> caption retrieval among one caption per product (per image if no ids given).

    ``top{k}``: the image's own product's caption is in the top k; ``top{k}_same_caption``:
    any caption identical to its own is (products can share a name). Each with its chance level.
    """
    parts.clip.eval()
    product_ids = list(range(len(captions))) if product_ids is None else list(product_ids)
    first = {}
    for i, p in enumerate(product_ids):
        first.setdefault(p, i)
    candidates = [captions[i] for i in first.values()]
    texts = sorted(set(candidates))
    text_emb = F.normalize(clip_text_embeds(parts, texts), dim=-1)
    cand_emb = text_emb[[texts.index(c) for c in candidates]]
    img_emb = F.normalize(clip_image_embeds(parts, clip_pixels(parts.image_processor, images)), dim=-1)
    scores = img_emb @ cand_emb.T
    column = {p: j for j, p in enumerate(first)}
    own_product = torch.zeros_like(scores, dtype=torch.bool)
    own_product[torch.arange(len(images)), torch.tensor([column[p] for p in product_ids])] = True
    same_caption = torch.tensor([[c == d for d in candidates] for c in captions])
    n_same = same_caption.sum(1).numpy()
    out = {"images": len(images), "candidates": len(candidates)}
    for k in ks:
        out[f"top{k}"] = _hit_probability(scores, own_product, k).mean().item()
        out[f"top{k}_chance"] = min(k, len(candidates)) / len(candidates)
        out[f"top{k}_same_caption"] = _hit_probability(scores, same_caption, k).mean().item()
        out[f"top{k}_same_caption_chance"] = _chance(len(candidates), n_same, k)
    return out


@torch.no_grad()
def distillation_agreement(parts: TinyParts, captions: Sequence[str]) -> dict:
    """How closely MultilingualCLIP follows CLIP's text embedding on (held-out) captions."""
    parts.mclip.eval()
    texts = sorted(set(captions))
    target = clip_text_embeds(parts, texts)
    ids, mask = tokenize(parts.mclip_tokenizer, texts)
    pred, _ = parts.mclip(input_ids=ids, attention_mask=mask)
    return {
        "captions": len(texts),
        "mse": F.mse_loss(pred, target).item(),
        "cosine": F.cosine_similarity(pred, target, dim=-1).mean().item(),
    }


@torch.no_grad()
def reconstruct(movq, images: np.ndarray, resolution: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, reconstructions) in [-1, 1], decoded the way the Kandinsky pipelines do."""
    movq.eval()
    x = movq_pixels(images, resolution)
    rec = [
        movq.decode(movq.encode(x[i : i + chunk]).latents, force_not_quantize=True).sample
        for i in range(0, len(x), chunk)
    ]
    return x, torch.cat(rec).clamp(-1, 1)


@torch.no_grad()
def reconstruction_error(movq, images: np.ndarray, resolution: int) -> dict:
    """MSE (pixels in [0, 1]), PSNR and colour MSE (over 8x8-cell averages) of MoVQ
    reconstructions; ``object_colour_error``, the mean distance in RGB levels (0-255) between
    the original's and the reconstruction's 8x8-cell mean colours over the cells that differ from
    the picture's background (its border's median colour) by more than 32 levels: the garment's
    or object's colour, which the whole-picture numbers dilute with background; latent mean/std."""
    x, rec = reconstruct(movq, images, resolution)
    mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
    block = max(1, x.shape[-1] // 8)  # colours averaged on an 8x8 grid: blur forgiven, hue not
    colour = F.mse_loss(F.avg_pool2d((rec + 1) / 2, block), F.avg_pool2d((x + 1) / 2, block)).item()
    cells_x, cells_rec = F.avg_pool2d((x + 1) * 127.5, block), F.avg_pool2d((rec + 1) * 127.5, block)
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2).median(dim=2).values
    objects = (cells_x - (border[:, :, None, None] + 1) * 127.5).norm(dim=1) > 32
    object_error = (cells_x - cells_rec).norm(dim=1)[objects].mean().item()
    z = torch.cat([movq.encode(x[i : i + 64]).latents for i in range(0, len(x), 64)])
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "colour_mse": colour,
        "object_colour_error": object_error,
        "latent_mean": z.mean().item(),
        "latent_std": z.std().item(),
    }


def reconstruction_grid(movq, images: np.ndarray, resolution: int, n: int = 8, zoom: int = 2) -> Image.Image:
    """A PNG-ready grid: originals on the top row, their MoVQ reconstructions below."""
    x, rec = reconstruct(movq, images[:n], resolution)
    rows = torch.cat([torch.cat(list(x), dim=2), torch.cat(list(rec), dim=2)], dim=1)
    pixels = ((rows + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(pixels)
    return grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
