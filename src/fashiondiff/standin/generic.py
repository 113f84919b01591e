"""The stand-in's generic domain: everyday objects in a room, not garments in a studio.

The embedded base generator is pre-trained on this domain only (as Kandinsky 2.1 was
pre-trained on the world, not on FashionGen), so that fine-tuning on the catalogue
measures a move from one look to another. The two domains share the vocabulary of
colours and materials ("black leather bag" here, "Black leather mini skirt" there),
not their shapes or settings: objects stand on a wooden floor in front of a pale or a dark
wall, with a shadow on the floor; garments hang centred on a light studio grey.
Captions are lowercase, as people type them. Usage (through the HDF5 writer)::

    write_synthetic("generic_train.h5", 96, 4, seed=1, domain=synthetic.GENERIC)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fashiondiff.standin.drawing import (
    COLOURS,
    DENIM_COLOURS,
    RGB,
    SIZE,
    Placement,
    draw_shape,
    ellipse,
    shade,
    to_pixels,
)

_ALL = ("plain", "leather", "knit", "denim", "striped", "checked", "polka-dot")
_PRINTS = ("plain", "striped", "checked", "polka-dot")


def _ball() -> dict:
    return {"body": [ellipse(0.5, 0.56, 0.27, 0.27)],
            "lines": [ellipse(0.5, 0.56, 0.12, 0.27, -90, 90, 12), ellipse(0.5, 0.56, 0.27, 0.08, 0, 180, 12)]}


def _mug() -> dict:
    handle = ellipse(0.64, 0.56, 0.14, 0.14, -70, 70, 10) + ellipse(0.64, 0.56, 0.07, 0.08, 70, -70, 10)
    return {"body": [[(0.28, 0.34), (0.64, 0.34), (0.64, 0.78), (0.60, 0.84), (0.32, 0.84), (0.28, 0.78)],
                     handle],
            "bands": [[(0.28, 0.34), (0.64, 0.34), (0.64, 0.39), (0.28, 0.39)]]}


def _bag() -> dict:
    strap = ellipse(0.5, 0.46, 0.20, 0.24, 180, 360, 14) + ellipse(0.5, 0.46, 0.15, 0.19, 360, 180, 14)
    return {"body": [[(0.24, 0.46), (0.76, 0.46), (0.82, 0.86), (0.18, 0.86)], strap],
            "bands": [[(0.24, 0.46), (0.76, 0.46), (0.5, 0.62)]],
            "dots": [(0.5, 0.60)]}


def _umbrella() -> dict:
    canopy = ellipse(0.5, 0.48, 0.36, 0.30, 180, 360, 20)
    scallops = [p for k in range(4) for p in ellipse(0.77 - 0.18 * k, 0.48, 0.09, 0.04, 0, 180, 6)]
    return {"body": [canopy + scallops],
            "lines": [[(0.5, 0.18), (0.5, 0.86)], ellipse(0.455, 0.86, 0.045, 0.05, 0, 180, 8),
                      [(0.5, 0.18), (0.32, 0.50)], [(0.5, 0.18), (0.68, 0.50)]]}


def _lamp() -> dict:
    return {"body": [[(0.36, 0.16), (0.64, 0.16), (0.76, 0.44), (0.24, 0.44)]],
            "bands": [[(0.47, 0.44), (0.53, 0.44), (0.53, 0.80), (0.47, 0.80)], ellipse(0.5, 0.82, 0.17, 0.05)]}


def _bottle() -> dict:
    body = ([(0.45, 0.14), (0.55, 0.14), (0.55, 0.28)] + ellipse(0.5, 0.42, 0.13, 0.14, -60, 0, 6)
            + [(0.63, 0.86), (0.37, 0.86)] + ellipse(0.5, 0.42, 0.13, 0.14, 180, 240, 6) + [(0.45, 0.28)])
    return {"body": [body], "bands": [[(0.44, 0.10), (0.56, 0.10), (0.56, 0.16), (0.44, 0.16)],
                                      [(0.37, 0.56), (0.63, 0.56), (0.63, 0.70), (0.37, 0.70)]]}


def _chair() -> dict:
    leg = lambda x: [(x, 0.60), (x + 0.05, 0.60), (x + 0.05, 0.88), (x, 0.88)]  # noqa: E731
    return {"body": [[(0.30, 0.12), (0.70, 0.12), (0.70, 0.50), (0.76, 0.50), (0.76, 0.60), (0.24, 0.60),
                      (0.24, 0.50), (0.30, 0.50)]],
            "bands": [leg(0.26), leg(0.69)], "lines": [[(0.30, 0.50), (0.70, 0.50)]]}


def _cushion() -> dict:
    return {"body": [[(0.20, 0.28), (0.50, 0.34), (0.80, 0.28), (0.74, 0.56), (0.80, 0.84), (0.50, 0.78),
                      (0.20, 0.84), (0.26, 0.56)]],
            "dots": [(0.5, 0.56)]}


def _kite() -> dict:
    return {"body": [[(0.5, 0.10), (0.75, 0.38), (0.5, 0.76), (0.25, 0.38)]],
            "lines": [[(0.5, 0.10), (0.5, 0.76)], [(0.25, 0.38), (0.75, 0.38)],
                      [(0.5, 0.76), (0.56, 0.82), (0.46, 0.88), (0.56, 0.94)]]}


def _house() -> dict:
    return {"body": [[(0.28, 0.46), (0.20, 0.48), (0.5, 0.16), (0.80, 0.48), (0.72, 0.46), (0.72, 0.86),
                      (0.28, 0.86)]],
            "cut": [[(0.45, 0.66), (0.55, 0.66), (0.55, 0.86), (0.45, 0.86)],
                    [(0.33, 0.56), (0.41, 0.56), (0.41, 0.64), (0.33, 0.64)],
                    [(0.59, 0.56), (0.67, 0.56), (0.67, 0.64), (0.59, 0.64)]]}


@dataclass(frozen=True)
class Kind:
    noun: str
    materials: tuple[str, ...]
    shape: dict


KINDS = (
    Kind("ball", ("plain", "leather", "knit", "striped", "polka-dot"), _ball()),
    Kind("mug", _PRINTS, _mug()),
    Kind("bag", ("plain", "leather", "denim", "knit", "checked", "striped"), _bag()),
    Kind("umbrella", _PRINTS, _umbrella()),
    Kind("lamp", ("plain", "knit", "striped", "checked", "polka-dot"), _lamp()),
    Kind("bottle", ("plain", "striped", "polka-dot"), _bottle()),
    Kind("chair", ("plain", "leather", "denim", "knit", "checked"), _chair()),
    Kind("cushion", _ALL, _cushion()),
    Kind("kite", _PRINTS, _kite()),
    Kind("house", ("plain", "striped", "checked"), _house()),
)

# The room: a pale or a dark wall, whichever stands out more from the object, and a wooden
# floor. Few nuisance variables on purpose: a from-scratch tiny U-Net learns a scene that
# varies in wall, floor, size and place far more slowly than one that varies in the object.
WALLS: tuple[RGB, ...] = ((210, 224, 238), (62, 72, 96))
FLOOR: RGB = (176, 136, 92)
HORIZON = 0.74  # the floor's top edge, unit coordinates


@dataclass(frozen=True)
class Thing:
    """One generic item (the file's "product"): what it is, its colour and material, its text."""

    product_id: int
    kind: Kind
    colour: str
    material: str
    text: dict  # input_* key -> str (all but input_pose)
    pattern_seed: int


@dataclass(frozen=True)
class View:
    """One picture of a thing: where it stands in the room."""

    placement: Placement


def thing(rng: np.random.Generator, product_id: int) -> Thing:
    kind = KINDS[rng.integers(len(KINDS))]
    material = kind.materials[rng.integers(len(kind.materials))]
    palette = DENIM_COLOURS if material == "denim" else tuple(COLOURS)
    colour = palette[rng.integers(len(palette))]
    name = " ".join([colour] + ([] if material == "plain" else [material]) + [kind.noun])
    text = {
        "input_name": name, "input_description": f"a {name} in a room.", "input_category": "OBJECTS",
        "input_subcategory": kind.noun.upper(), "input_gender": "UNISEX", "input_composition": "",
        "input_concat_description": f"{name} a {name} in a room.", "input_department": "HOME",
        "input_season": "", "input_brand": "",
    }
    return Thing(product_id, kind, colour, material, text, int(rng.integers(2**31)))


def view(rng: np.random.Generator, index: int) -> View:
    place = Placement(rng.uniform(-0.04, 0.04), rng.uniform(-0.02, 0.02), rng.uniform(0.88, 0.96),
                      rng.uniform(-3.0, 3.0), flip=index % 2 == 1)
    return View(place)


def wall_for(colour: RGB) -> RGB:
    """The wall that differs most from ``colour`` (sum of absolute RGB differences)."""
    return max(WALLS, key=lambda wall: sum(abs(a - b) for a, b in zip(wall, colour)))


def render(item: Thing, pose: View, swatch: Image.Image) -> np.ndarray:
    """The (256, 256, 3) uint8 picture of ``item`` in its room."""
    wall = wall_for(COLOURS[item.colour])
    img = Image.new("RGB", (SIZE, SIZE), wall)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(HORIZON * SIZE), SIZE, SIZE], fill=FLOOR)
    bottom = max(y for poly in item.kind.shape["body"] for _, y in to_pixels(pose.placement)(poly))
    cx = (0.5 + pose.placement.dx) * SIZE
    half = 0.28 * pose.placement.scale * SIZE
    draw.ellipse([cx - half, bottom - 8, cx + half, bottom + 8], fill=shade(FLOOR, 0.75))  # its shadow
    draw_shape(img, item.kind.shape, item.colour, swatch, pose.placement, cut_fill=wall)
    return np.asarray(img, dtype=np.uint8)
