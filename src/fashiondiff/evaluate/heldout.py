"""One domain's held-out set: its rows, the prompts drawn from them, and R-precision's captions.

Usage::

    held = held_out("catalogue", Path("data/extracted/validation"), 0.1, params, clip)
    held.prompts["caption"][i], held.prompts["image"][i]      # prompt i and its own photo
    held.text_embeds[held.candidates[i]]                       # its R candidates, own first

Prompts: ``evaluate.num_prompts`` rows in a seeded order, one row per product first, then second
poses, ... When the domain holds fewer rows than that, the rows are used again, each further
pass in a fresh seeded order (drawn with replacement: every row ``n // rows`` or one more
times); ``with_replacement`` says so, and evaluation.json with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashiondiff.data.split import select_split
from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.metrics import r_precision_candidates

REQUIRED_COLUMNS = ("row", "product_id", "caption", "image")


def heldout_rows(captions_dir: str | Path, holdout_fraction: float, seed: int) -> pd.DataFrame:
    """Held-out rows with a caption, in ``row`` order (``holdout_fraction`` > 0: by product)."""
    path = Path(captions_dir) / "captions.parquet"
    try:
        table = pd.read_parquet(path)
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such captions table (run extract first)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{path}: missing column {missing[0]}")
    rows = select_split(table, "validation", holdout_fraction, seed)
    rows = rows[rows["caption"].astype(str).str.strip() != ""]
    if len(rows) < 2:
        raise PipelineError(f"{path}: {len(rows)} held-out rows with a caption; evaluation needs >= 2")
    return rows.sort_values("row", kind="stable").reset_index(drop=True)


def _one_pass(rows: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    shuffled = rows.iloc[rng.permutation(len(rows))]
    first = ~shuffled["product_id"].duplicated()
    return pd.concat([shuffled[first], shuffled[~first]])


def choose_prompts(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows in a seeded order: one row per product first, then second poses, ...; past the
    last row, further passes over all of them (pass ``p`` seeded ``(seed, p)``)."""
    passes = [_one_pass(rows, np.random.default_rng(seed if p == 0 else [seed, p])) for p in range(-(-n // len(rows)))]
    return pd.concat(passes).head(n).reset_index(drop=True)


def load_real(captions_dir: Path, relative: str, resolution: int) -> Image.Image:
    """A real image at the generation resolution (bicubic), RGB."""
    path = captions_dir / relative
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (FileNotFoundError, OSError) as exc:
        raise PipelineError(f"{path}: cannot read held-out image ({type(exc).__name__})") from None
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    return image


def to_uint8(images):
    """PIL images -> uint8 (N, 3, H, W) tensor, the input torchmetrics' FID expects."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


@dataclass
class HeldOut:
    """One domain's held-out set, prepared once for both models (small: no images in it)."""

    name: str
    folder: Path
    rows: pd.DataFrame  # every held-out row (the real side of fd_clip and FID)
    prompts: pd.DataFrame  # one row per prompt: its caption and its own photo
    texts: list[str]  # the distinct held-out captions: R-precision's pool
    text_embeds: np.ndarray  # of ``texts``
    own: np.ndarray  # each prompt's row in ``texts``
    candidates: np.ndarray  # (prompts, R) rows of ``texts``, own first
    with_replacement: bool  # fewer held-out rows than prompts: rows used more than once

    @property
    def captions(self) -> list[str]:
        return self.prompts["caption"].astype(str).tolist()

    def real_images(self, numbers, resolution: int) -> list[Image.Image]:
        """The own photos of prompts ``numbers``."""
        return [load_real(self.folder, self.prompts["image"].iloc[i], resolution) for i in numbers]


def held_out(name: str, folder: Path, holdout_fraction: float, params, clip) -> HeldOut:
    """Choose the domain's prompts and candidates; embed its distinct captions."""
    ev = params.evaluate
    rows = heldout_rows(folder, holdout_fraction, params.seed)
    prompts = choose_prompts(rows, ev.num_prompts, params.seed)
    texts = sorted(set(rows["caption"].astype(str)))
    r = min(ev.r_precision_candidates, len(texts))
    if r < 2:
        raise PipelineError(f"{folder}: 1 distinct held-out caption; R-precision needs >= 2")
    where = {text: i for i, text in enumerate(texts)}
    own = np.array([where[c] for c in prompts["caption"].astype(str)])
    return HeldOut(
        name,
        folder,
        rows,
        prompts[["caption", "image"]],
        texts,
        clip.encode_texts(texts),
        own,
        r_precision_candidates(own, len(texts), r, params.seed),
        len(rows) < ev.num_prompts,
    )
