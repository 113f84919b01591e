"""evaluate's image + text edits: which photos, which prompts, what is measured.

For each domain, the first ``evaluate.edit_items`` held-out prompts' own photos are edited
toward an *edit prompt*: the item's caption with its colour word changed, by a fixed rule (the
next colour of :data:`COLOURS`, wrapping; case kept: "Green sweater" -> "Yellow sweater"). A
colour is the stylist's commonest edit (the same garment in another colour), it leaves the
garment's shape to keep, and it is what CLIP sees most reliably; a caption without a colour word
takes the next edited item's caption instead (another held-out caption). Each photo is edited at
every strength of ``evaluate.edit_strengths`` (img2img: :func:`fashiondiff.sampling.as_img2img`)
and once by 2.1's mix (``prior.interpolate`` of the photo, weight ``evaluate.mix_image_weight``,
and the edit prompt, weight 1 - that), item ``i`` seeded ``seed + i``. Two numbers per edit, in
the base prior's CLIP space (the one ``clip_score`` uses):

* fidelity, ``max(100 * cos(E_image(edit), E_image(source)), 0)``: CLIP-I, the image-image
  similarity DreamBooth (Ruiz et al., 2023) reports as subject fidelity. LPIPS and DreamSim
  need weights of their own (AlexNet/VGG, DINO + OpenCLIP) that this project can neither fetch
  nor check; CLIP's image tower is already the model's own, at every size;
* alignment, ``max(100 * cos(E_image(edit), E_text(edit prompt)), 0)``: clip_score against the
  edit prompt.

Written per domain and model as ``edit_fidelity_sNN`` / ``edit_clip_score_sNN`` (NN = strength
x 100) and ``mix_fidelity`` / ``mix_clip_score``. Usage::

    items = edit_items(held, params.evaluate.edit_items)   # [(photo number, edit prompt), ...]
    variant_name(0.3) == "s30"
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from fashiondiff.evaluate.clip import clip_score

COLOURS = (
    "black",
    "white",
    "red",
    "blue",
    "green",
    "yellow",
    "pink",
    "grey",
    "brown",
    "navy",
    "beige",
    "orange",
    "purple",
    "burgundy",
    "khaki",
    "cream",
)
_WORD = re.compile(r"[A-Za-z]+")
MIX = "mix"


def variant_name(strength: float) -> str:
    """``s30`` for strength 0.3: the suffix of the metric names and the samples' folder."""
    return f"s{round(strength * 100):02d}"


def variants(strengths: Sequence[float]) -> list[str]:
    """The edit variants of a run, in order: one per strength, then the mix."""
    return [variant_name(s) for s in strengths] + [MIX]


def recoloured(caption: str) -> str | None:
    """``caption`` with its first colour word replaced by the next colour (case kept), or None."""
    for match in _WORD.finditer(caption):
        word = match.group(0)
        if word.lower() in COLOURS:
            new = COLOURS[(COLOURS.index(word.lower()) + 1) % len(COLOURS)]
            new = new.capitalize() if word[0].isupper() else new
            return caption[: match.start()] + new + caption[match.end() :]
    return None


def edit_prompts(captions: Sequence[str]) -> list[str]:
    """The edit prompt of each item (see the module's docstring)."""
    n = len(captions)
    return [recoloured(c) or (captions[(i + 1) % n] if n > 1 else c) for i, c in enumerate(captions)]


def pair_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row by row ``clip_score(a[i], b[i])``: each pair alone, whoever computed its batch."""
    return np.array([clip_score(a[i : i + 1], b[i : i + 1]) for i in range(len(a))])
