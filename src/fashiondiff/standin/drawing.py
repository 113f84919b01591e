"""Drawing primitives shared by the stand-in's two picture domains.

Both the catalogue (``synthetic``: garments in a studio) and the generic domain
(``generic``: everyday objects in a room) draw a *shape* -- polygons in unit
coordinates (x right, y down) -- filled with a full-frame *swatch* of one colour
and one material, then outlined. The two domains share the vocabulary of colours
and materials (so a caption's "red leather" means the same pixels in both), not
their shapes or settings. Usage::

    swatch = paint_swatch("red", "leather", seed=7)
    img = Image.new("RGB", (SIZE, SIZE), (245, 245, 245))
    draw_shape(img, shape, "red", swatch, Placement(0.0, 0.0, 1.0, 0.0, False), cut_fill=(245, 245, 245))

A shape is a dict: ``body`` (filled with the swatch), optional ``cut`` (holes, filled
with ``cut_fill``), ``bands`` (a darker or lighter shade of the colour), ``lines`` and
``dots`` (the edge colour).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256  # FashionGen's image side

COLOURS = {
    "black": (28, 28, 30), "white": (250, 250, 246), "red": (200, 30, 36),
    "blue": (40, 90, 200), "green": (40, 140, 60), "yellow": (240, 200, 30),
    "pink": (240, 140, 180), "grey": (135, 135, 140), "brown": (120, 75, 40),
    "navy": (25, 35, 90), "beige": (215, 190, 150), "orange": (235, 120, 30),
}
DENIM_COLOURS = ("blue", "navy", "black")
RGB = tuple[int, int, int]


def shade(rgb: RGB, factor: float) -> RGB:
    """Darken (factor < 1) or lighten towards white (factor > 1)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)
    t = factor - 1
    return tuple(int(c + (255 - c) * t) for c in rgb)


def is_dark(rgb: RGB) -> bool:
    return sum(rgb) < 450


# --- materials: one small painter each, over a canvas already filled with the base colour ---

Painter = Callable[[ImageDraw.ImageDraw, RGB, np.random.Generator], None]


def _contrast(base: RGB) -> RGB:
    """The pattern colour drawn on ``base``: off-white on dark colours, navy on light ones."""
    return (250, 250, 246) if is_dark(base) else (25, 35, 90)


def _striped(draw, base, rng) -> None:
    for y in range(0, SIZE, 24):
        draw.rectangle([0, y, SIZE, y + 11], fill=_contrast(base))


def _checked(draw, base, rng) -> None:
    line = _contrast(base) if is_dark(base) else shade(base, 0.45)
    for v in range(0, SIZE, 28):
        draw.rectangle([v, 0, v + 6, SIZE], fill=line)
        draw.rectangle([0, v, SIZE, v + 6], fill=line)


def _polka_dot(draw, base, rng) -> None:
    for row, y in enumerate(range(6, SIZE, 26)):
        for x in range(6 + 13 * (row % 2), SIZE, 26):
            draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=_contrast(base))


def _knit(draw, base, rng) -> None:
    rib = shade(base, 0.65) if sum(base) > 120 else shade(base, 1.35)
    for x in range(0, SIZE, 8):
        draw.line([(x, 0), (x, SIZE)], fill=rib, width=3)


def _denim(draw, base, rng) -> None:
    twill = shade(base, 1.3)
    for x in range(-SIZE, SIZE, 5):
        draw.line([(x, 0), (x + SIZE, SIZE)], fill=twill, width=1)


def _leather(draw, base, rng) -> None:
    shine = shade(base, 1.55)
    for x0 in range(-30, SIZE, 36):  # glossy highlight strokes, wide enough for 64x64
        for y0 in range(-40, SIZE, 70):
            x, y = x0 + rng.uniform(0, 20), y0 + rng.uniform(0, 30)
            length, width = rng.uniform(30, 60), int(rng.integers(5, 9))
            draw.line([(x, y), (x + 0.35 * length, y + length)], fill=shine, width=width)


PAINTERS: dict[str, Painter | None] = {
    "plain": None, "leather": _leather, "knit": _knit, "denim": _denim,
    "striped": _striped, "checked": _checked, "polka-dot": _polka_dot,
}
MATERIALS = tuple(PAINTERS)


def paint_swatch(colour: str, material: str, seed: int) -> Image.Image:
    """A full-frame swatch of ``colour`` in ``material``; a shape's mask cuts it out."""
    base = COLOURS[colour]
    img = Image.new("RGB", (SIZE, SIZE), base)
    painter = PAINTERS[material]
    if painter is not None:
        painter(ImageDraw.Draw(img), base, np.random.default_rng(seed))
    return img


# --- placing and drawing a shape ---------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where a shape goes: shift (unit coordinates), scale and rotation about the centre, mirror."""

    dx: float
    dy: float
    scale: float
    angle: float  # degrees
    flip: bool


def to_pixels(place: Placement) -> Callable[[list], list]:
    """Unit coordinates -> pixel coordinates of this placement."""
    cos, sin = math.cos(math.radians(place.angle)), math.sin(math.radians(place.angle))

    def apply(points):
        out = []
        for x, y in points:
            x, y = (1 - x if place.flip else x) - 0.5, y - 0.5
            x, y = place.scale * (cos * x - sin * y), place.scale * (sin * x + cos * y)
            out.append(((x + 0.5 + place.dx) * SIZE, (y + 0.5 + place.dy) * SIZE))
        return out

    return apply


def draw_shape(img: Image.Image, shape: dict, colour: str, swatch: Image.Image, place: Placement,
               cut_fill: RGB) -> None:
    """Paint ``shape`` onto ``img`` in place: swatch-filled body, holes, bands, lines, dots."""
    to_px, base = to_pixels(place), COLOURS[colour]
    edge = shade(base, 0.55) if sum(base) > 150 else shade(base, 1.6)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in shape["body"]:
        mdraw.polygon(to_px(poly), fill=255)
    for poly in shape.get("cut", ()):
        mdraw.polygon(to_px(poly), fill=0)
    img.paste(swatch, (0, 0), mask)
    draw = ImageDraw.Draw(img)
    for poly in shape["body"]:
        draw.polygon(to_px(poly), outline=edge, width=2)
    for poly in shape.get("cut", ()):
        draw.polygon(to_px(poly), fill=cut_fill, outline=edge, width=2)
    band = shade(base, 0.8) if sum(base) > 150 else shade(base, 1.25)
    for poly in shape.get("bands", ()):
        draw.polygon(to_px(poly), fill=band, outline=edge, width=2)
    for line in shape.get("lines", ()):
        draw.line(to_px(line), fill=edge, width=2)
    r = 3.5 * place.scale
    for x, y in to_px(shape.get("dots", ())):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=edge)


def ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 360.0,
            n: int = 24) -> list:
    """Points of an ellipse (or of its arc from ``start`` to ``end`` degrees, y down)."""
    return [(cx + rx * math.cos(math.radians(start + (end - start) * k / n)),
             cy + ry * math.sin(math.radians(start + (end - start) * k / n))) for k in range(n + 1)]
