"""Synthetic FashionGen-layout HDF5 files whose pictures follow their text.

Each product is a drawn garment (type, colour, material/pattern) on a light
background; its title says exactly that ("Black leather mini skirt"), so a
text-to-image model has something to learn. Poses of a product move the garment
slightly (shift, scale, small rotation, flip) but keep its identity.

Usage::

    write_synthetic("train.h5", n_products=96, poses_per_product=4, seed=1)
    synthesize("data/synthetic", train_products=96, validation_products=24,
               poses_per_product=4, seed=0)
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from fashiondiff.errors import PipelineError
from fashiondiff.io import atomic_dir

SIZE = 256  # FashionGen's image side
WRITE_CHUNK = 128  # rows rendered and written at a time: memory stays ~25 MB

TEXT_KEYS = (
    "input_name", "input_description", "input_category", "input_subcategory", "input_pose",
    "input_gender", "input_composition", "input_concat_description", "input_department",
    "input_season", "input_brand",
)

COLOURS = {
    "black": (28, 28, 30), "white": (250, 250, 246), "red": (200, 30, 36),
    "blue": (40, 90, 200), "green": (40, 140, 60), "yellow": (240, 200, 30),
    "pink": (240, 140, 180), "grey": (135, 135, 140), "brown": (120, 75, 40),
    "navy": (25, 35, 90), "beige": (215, 190, 150), "orange": (235, 120, 30),
}
DENIM_COLOURS = ("blue", "navy", "black")
# Materials and patterns: each has its own drawing in _paint_material.
MATERIALS = ("plain", "leather", "knit", "denim", "striped", "checked", "polka-dot")
PLAIN_FABRICS = ("cotton", "crêpe", "poplin", "jersey", "wool")
COMPOSITIONS = {
    "plain": ("100% cotton", "100% polyester", "95% viscose, 5% elastane", "100% wool"),
    "leather": ("100% lambskin", "100% calfskin leather"),
    "knit": ("70% wool, 30% cashmere", "100% merino wool", "100% cotton"),
    "denim": ("100% cotton", "98% cotton, 2% elastane"),
    "striped": ("100% cotton", "100% linen"), "checked": ("100% wool", "100% cotton"),
    "polka-dot": ("100% silk", "100% polyester"),
}
DETAILS = (
    "Appliqué detailing at front.", "Lined in crêpe de chine.", "Tonal stitching throughout.",
    "Zip closure at back.", "Relaxed fit.", "Raw-edge hem.", "Made in Italy.",
    "Cut for a slim fit.", "Logo embroidered at hem.", "Fabric façonné for a soft drape.",
)
BRANDS = ("Maison Lumière", "Atelier Noé", "Søren Kjær", "Nordwärts", "Alba & Co",
          "Rue Mercier", "Kobo Studio", "Halden")
SEASONS = ("SS2016", "FW2016", "SS2017", "FW2017", "SS2018")
POSES = tuple(f"id_gridfs_{i}" for i in range(1, 7))  # FashionGen's pose strings


# --- garment silhouettes, in unit coordinates (x right, y down) -------------------

def _tee(sleeve_end: float, hem: float, half: float = 0.19) -> list:
    """A top, sleeves ending at height ``sleeve_end`` (short or long), body ``2 * half`` wide."""
    long_ = sleeve_end > 0.5
    out_x, in_x = (0.10, 0.21) if long_ else (0.12, 0.24)
    left, right = 0.5 - half, 0.5 + half
    return [(0.40, 0.16), (0.60, 0.16), (0.78, 0.22), (1 - out_x, sleeve_end - 0.02),
            (1 - in_x, sleeve_end + 0.02), (right, 0.40), (right, hem), (left, hem),
            (left, 0.40), (in_x, sleeve_end + 0.02), (out_x, sleeve_end - 0.02), (0.22, 0.22)]


def _neckline(cx: float, top: float, rx: float, depth: float, n: int = 12) -> list:
    """The lower half of an ellipse hanging from the neck edge at height ``top``."""
    return [(cx + rx * math.cos(math.pi * k / n), top + depth * math.sin(math.pi * k / n))
            for k in range(n + 1)]


def _shape_tshirt() -> dict:
    return {"body": [_tee(0.40, 0.84)], "cut": [_neckline(0.5, 0.16, 0.085, 0.05)],
            "lines": [[(0.31, 0.80), (0.69, 0.80)]]}


def _shape_sweater() -> dict:
    return {"body": [_tee(0.80, 0.76, half=0.22)], "cut": [_neckline(0.5, 0.16, 0.08, 0.045)],
            "bands": [[(0.28, 0.70), (0.72, 0.70), (0.72, 0.76), (0.28, 0.76)],
                      [(0.10, 0.74), (0.21, 0.78), (0.21, 0.82), (0.10, 0.78)],
                      [(0.90, 0.74), (0.79, 0.78), (0.79, 0.82), (0.90, 0.78)]]}


def _shape_shirt() -> dict:
    collar = [[(0.40, 0.16), (0.50, 0.24), (0.43, 0.27)],
              [(0.60, 0.16), (0.50, 0.24), (0.57, 0.27)]]
    body = _tee(0.80, 0.90, half=0.16)
    body[6:8] = [(0.66, 0.90), (0.58, 0.95), (0.42, 0.95), (0.34, 0.90)]  # shirt-tail hem
    return {"body": [body], "bands": collar, "lines": [[(0.50, 0.24), (0.50, 0.95)]],
            "dots": [(0.53, 0.36 + 0.11 * k) for k in range(5)]}


def _shape_jacket(hem: float, flare: float) -> dict:
    body = _tee(0.78, hem)
    body[6], body[7] = (0.69 + flare, hem), (0.31 - flare, hem)
    lapels = [[(0.42, 0.16), (0.50, 0.46), (0.40, 0.30)],
              [(0.58, 0.16), (0.50, 0.46), (0.60, 0.30)]]
    open_front = [(0.43, 0.16), (0.57, 0.16), (0.50, 0.46)]  # the V between the lapels
    return {"body": [body], "cut": [open_front], "bands": lapels,
            "lines": [[(0.50, 0.46), (0.50, hem)], [(0.35, 0.60), (0.45, 0.60)],
                      [(0.55, 0.60), (0.65, 0.60)]],
            "dots": [(0.53, 0.52 + 0.10 * k) for k in range(int((hem - 0.5) / 0.1))]}


def _shape_dress() -> dict:
    return {"body": [[(0.39, 0.10), (0.43, 0.10), (0.44, 0.22), (0.56, 0.22), (0.57, 0.10),
                      (0.61, 0.10), (0.63, 0.30), (0.59, 0.45), (0.80, 0.92), (0.20, 0.92),
                      (0.41, 0.45), (0.37, 0.30)]],
            "lines": [[(0.41, 0.45), (0.59, 0.45)]]}


def _shape_skirt(top: float, hem: float, half_hem: float) -> dict:
    return {"body": [[(0.33, top), (0.67, top), (0.5 + half_hem, hem), (0.5 - half_hem, hem)]],
            "bands": [[(0.33, top), (0.67, top), (0.67, top + 0.05), (0.33, top + 0.05)]]}


def _shape_trousers(top: float, hem: float, crotch: float) -> dict:
    return {"body": [[(0.32, top), (0.68, top), (0.73, hem), (0.53, hem + 0.01), (0.50, crotch),
                      (0.47, hem + 0.01), (0.27, hem)]],
            "bands": [[(0.32, top), (0.68, top), (0.68, top + 0.05), (0.32, top + 0.05)]],
            "lines": [[(0.50, top + 0.05), (0.50, crotch)]]}


@dataclass(frozen=True)
class Garment:
    noun: str
    category: str
    subcategory: str
    women_only: bool
    materials: tuple[str, ...]
    shape: dict


_ALL = MATERIALS
GARMENTS = (
    Garment("mini skirt", "SKIRTS", "MINI SKIRTS", True, _ALL, _shape_skirt(0.26, 0.70, 0.32)),
    Garment("skirt", "SKIRTS", "MIDI SKIRTS", True, _ALL, _shape_skirt(0.14, 0.90, 0.30)),
    Garment("dress", "DRESSES", "SHORT DRESSES", True,
            ("plain", "leather", "knit", "striped", "checked", "polka-dot"), _shape_dress()),
    Garment("t-shirt", "TOPS", "T-SHIRTS", False,
            ("plain", "knit", "striped", "polka-dot"), _shape_tshirt()),
    Garment("sweater", "SWEATERS", "CREWNECKS", False,
            ("plain", "knit", "striped", "checked"), _shape_sweater()),
    Garment("shirt", "SHIRTS", "SHIRTS", False,
            ("plain", "denim", "striped", "checked", "polka-dot"), _shape_shirt()),
    Garment("trousers", "PANTS", "TROUSERS", False,
            ("plain", "leather", "denim", "striped", "checked"), _shape_trousers(0.08, 0.94, 0.38)),
    Garment("shorts", "SHORTS", "SHORTS", False,
            ("plain", "leather", "denim", "striped", "checked"), _shape_trousers(0.26, 0.68, 0.50)),
    Garment("jacket", "JACKETS & COATS", "JACKETS", False,
            ("plain", "leather", "denim", "checked"), _shape_jacket(0.74, 0.0)),
    Garment("coat", "JACKETS & COATS", "COATS", False,
            ("plain", "leather", "checked", "knit"), _shape_jacket(0.95, 0.04)),
)


# --- one product, its poses and its picture ---------------------------------------

@dataclass(frozen=True)
class Product:
    product_id: int
    garment: Garment
    colour: str
    material: str
    text: dict  # input_* key -> str (all but input_pose)
    pattern_seed: int


@dataclass(frozen=True)
class Pose:
    dx: float
    dy: float
    scale: float
    angle: float  # degrees
    flip: bool
    background: tuple[int, int, int]


def _product(rng: np.random.Generator, product_id: int) -> Product:
    garment = GARMENTS[rng.integers(len(GARMENTS))]
    material = garment.materials[rng.integers(len(garment.materials))]
    palette = DENIM_COLOURS if material == "denim" else tuple(COLOURS)
    colour = palette[rng.integers(len(palette))]
    words = [colour] + ([] if material == "plain" else [material]) + [garment.noun]
    name = " ".join(words).capitalize()
    fabric = PLAIN_FABRICS[rng.integers(len(PLAIN_FABRICS))] if material == "plain" else material
    if material in ("striped", "checked", "polka-dot"):
        fabric = f"{material} {PLAIN_FABRICS[rng.integers(len(PLAIN_FABRICS))]}"
    picks = rng.choice(len(DETAILS), size=int(rng.integers(1, 4)), replace=False)
    description = " ".join([f"{garment.noun.capitalize()} in {colour} {fabric}."]
                           + [DETAILS[i] for i in sorted(picks)])
    gender = "WOMEN" if garment.women_only or rng.random() < 0.5 else "MEN"
    comps = COMPOSITIONS[material]
    text = {
        "input_name": name, "input_description": description,
        "input_category": garment.category, "input_subcategory": garment.subcategory,
        "input_gender": gender, "input_composition": comps[rng.integers(len(comps))],
        "input_concat_description": f"{name} {description}", "input_department": "CLOTHING",
        "input_season": SEASONS[rng.integers(len(SEASONS))],
        "input_brand": BRANDS[rng.integers(len(BRANDS))],
    }
    return Product(product_id, garment, colour, material, text, int(rng.integers(2**31)))


def _pose(rng: np.random.Generator, index: int) -> Pose:
    if index == 0:  # the first pose is the catalogue shot: centred, upright
        move = (0.0, 0.0, 1.0, 0.0)
    else:
        move = (rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04), rng.uniform(0.9, 1.04),
                rng.uniform(-7.0, 7.0))
    grey = int(rng.integers(236, 252))
    background = (grey, grey - int(rng.integers(0, 6)), grey - int(rng.integers(0, 10)))
    return Pose(*move, flip=index % 2 == 1, background=background)


def _shade(rgb: tuple, factor: float) -> tuple[int, int, int]:
    """Darken (factor < 1) or lighten towards white (factor > 1)."""
    if factor <= 1:
        return tuple(int(c * factor) for c in rgb)
    t = factor - 1
    return tuple(int(c + (255 - c) * t) for c in rgb)


def _transform(pose: Pose):
    """Unit coordinates -> pixel coordinates of this pose."""
    cos, sin = math.cos(math.radians(pose.angle)), math.sin(math.radians(pose.angle))

    def apply(points):
        out = []
        for x, y in points:
            x, y = (1 - x if pose.flip else x) - 0.5, y - 0.5
            x, y = pose.scale * (cos * x - sin * y), pose.scale * (sin * x + cos * y)
            out.append(((x + 0.5 + pose.dx) * SIZE, (y + 0.5 + pose.dy) * SIZE))
        return out

    return apply


def _paint_material(product: Product) -> Image.Image:
    """A full-frame swatch of the product's colour and material; the silhouette masks it."""
    base = COLOURS[product.colour]
    other = (250, 250, 246) if sum(base) < 450 else (25, 35, 90)  # contrasting pattern colour
    img = Image.new("RGB", (SIZE, SIZE), base)
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(product.pattern_seed)
    m = product.material
    if m == "striped":
        for y in range(0, SIZE, 24):
            draw.rectangle([0, y, SIZE, y + 11], fill=other)
    elif m == "checked":
        line = _shade(other, 1.0) if sum(base) < 450 else _shade(base, 0.45)
        for v in range(0, SIZE, 28):
            draw.rectangle([v, 0, v + 6, SIZE], fill=line)
            draw.rectangle([0, v, SIZE, v + 6], fill=line)
    elif m == "polka-dot":
        for row, y in enumerate(range(6, SIZE, 26)):
            for x in range(6 + 13 * (row % 2), SIZE, 26):
                draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=other)
    elif m == "knit":
        rib = _shade(base, 0.65) if sum(base) > 120 else _shade(base, 1.35)
        for x in range(0, SIZE, 8):
            draw.line([(x, 0), (x, SIZE)], fill=rib, width=3)
    elif m == "denim":
        twill = _shade(base, 1.3)
        for x in range(-SIZE, SIZE, 5):
            draw.line([(x, 0), (x + SIZE, SIZE)], fill=twill, width=1)
    elif m == "leather":
        shine = _shade(base, 1.55)
        for x0 in range(-30, SIZE, 36):  # glossy highlight strokes, wide enough for 64x64
            for y0 in range(-40, SIZE, 70):
                x, y = x0 + rng.uniform(0, 20), y0 + rng.uniform(0, 30)
                length, width = rng.uniform(30, 60), int(rng.integers(5, 9))
                draw.line([(x, y), (x + 0.35 * length, y + length)], fill=shine, width=width)
    return img


def render(product: Product, pose: Pose, swatch: Image.Image | None = None) -> np.ndarray:
    """The (256, 256, 3) uint8 picture of ``product`` in ``pose``."""
    swatch = swatch or _paint_material(product)
    shape, to_px = product.garment.shape, _transform(pose)
    base = COLOURS[product.colour]
    edge = _shade(base, 0.55) if sum(base) > 150 else _shade(base, 1.6)
    img = Image.new("RGB", (SIZE, SIZE), pose.background)
    draw = ImageDraw.Draw(img)
    shadow = _shade(pose.background, 0.9)
    for poly in shape["body"]:  # soft drop shadow
        draw.polygon([(x + 5, y + 5) for x, y in to_px(poly)], fill=shadow)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mdraw = ImageDraw.Draw(mask)
    for poly in shape["body"]:
        mdraw.polygon(to_px(poly), fill=255)
    for poly in shape.get("cut", ()):
        mdraw.polygon(to_px(poly), fill=0)
    img.paste(swatch, (0, 0), mask)
    for poly in shape["body"]:
        draw.polygon(to_px(poly), outline=edge, width=2)
    for poly in shape.get("cut", ()):
        draw.polygon(to_px(poly), fill=pose.background, outline=edge, width=2)
    band = _shade(base, 0.8) if sum(base) > 150 else _shade(base, 1.25)
    for poly in shape.get("bands", ()):
        draw.polygon(to_px(poly), fill=band, outline=edge, width=2)
    for line in shape.get("lines", ()):
        draw.line(to_px(line), fill=edge, width=2)
    r = 3.5 * pose.scale
    for x, y in to_px(shape.get("dots", ())):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=edge)
    return np.asarray(img, dtype=np.uint8)


# --- the HDF5 file ------------------------------------------------------------------

def _catalogue(n_products: int, poses_per_product: int, seed: int, first_product_id: int):
    """All products and, row by row, (product index, pose): the file's text, decided up front."""
    rng = np.random.default_rng(seed)
    products = [_product(rng, first_product_id + i) for i in range(n_products)]
    rows = [(p, k, _pose(rng, k)) for p in range(n_products) for k in range(poses_per_product)]
    return products, rows


def _bytes_column(values: list[str]) -> np.ndarray:
    encoded = [v.encode("latin-1") for v in values]
    width = max(1, max(len(b) for b in encoded))
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def _write(path: Path, products: list[Product], rows: list) -> None:
    n = len(rows)
    with h5py.File(path, "w", track_order=False) as f:
        images = f.create_dataset("input_image", shape=(n, SIZE, SIZE, 3), dtype=np.uint8,
                                  track_times=False)
        for key in TEXT_KEYS:
            if key == "input_pose":
                values = [POSES[k % len(POSES)] for _, k, _ in rows]
            else:
                values = [products[p].text[key] for p, _, _ in rows]
            f.create_dataset(key, data=_bytes_column(values), track_times=False)
        ids = np.array([products[p].product_id for p, _, _ in rows], dtype=np.int64)
        f.create_dataset("input_productID", data=ids.reshape(-1, 1), track_times=False)
        msrp = np.array([_msrp(products[p]) for p, _, _ in rows], dtype=np.float32)
        f.create_dataset("input_msrpUSD", data=msrp.reshape(-1, 1), track_times=False)
        index = np.arange(n, dtype=np.int64)
        f.create_dataset("index", data=index.reshape(-1, 1), track_times=False)
        f.create_dataset("index_2", data=index, track_times=False)
        swatches: dict[int, Image.Image] = {}
        for start in range(0, n, WRITE_CHUNK):
            block = rows[start:start + WRITE_CHUNK]
            pictures = np.empty((len(block), SIZE, SIZE, 3), dtype=np.uint8)
            for i, (p, _, pose) in enumerate(block):
                if p not in swatches:
                    swatches = {p: _paint_material(products[p])}  # rows are grouped by product
                pictures[i] = render(products[p], pose, swatches[p])
            images[start:start + len(block)] = pictures


def _msrp(product: Product) -> float:
    digest = hashlib.blake2b(str(product.pattern_seed).encode(), digest_size=4).digest()
    return float(60 + int.from_bytes(digest, "big") % 2400)


def write_synthetic(path: str | os.PathLike, n_products: int, poses_per_product: int, seed: int,
                    *, first_product_id: int = 100_000) -> Path:
    """Write a FashionGen-layout HDF5 file of ``n_products`` x ``poses_per_product`` rows.

    Deterministic: the same arguments give byte-identical datasets. Product ids are
    ``first_product_id, first_product_id + 1, ...``. Written to a temporary file
    beside ``path`` and renamed, so ``path`` is never half-written.
    """
    if n_products < 1 or poses_per_product < 1:
        raise ValueError("n_products and poses_per_product must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    products, rows = _catalogue(n_products, poses_per_product, seed, first_product_id)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # h5py creates it, usual mode
    try:
        _write(tmp, products, rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def derive_seed(seed: int, name: str) -> int:
    """A stable sub-seed for ``name`` (e.g. "train"), independent of Python's hash()."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def synthesize(out_dir: str | os.PathLike, train_products: int, validation_products: int,
               poses_per_product: int, seed: int) -> dict[str, Path]:
    """Write ``fashiongen_train.h5`` and ``fashiongen_validation.h5`` into ``out_dir``, atomically.

    The two files use different seeds derived from ``seed`` and disjoint product ids.
    """
    for key, value in (("train_products", train_products),
                       ("validation_products", validation_products),
                       ("poses_per_product", poses_per_product)):
        if value < 1:
            raise PipelineError(f"params: embedded.synthetic.{key} must be >= 1, got {value}")
    out_dir = Path(out_dir)
    first_ids = {"train": 100_000, "validation": 100_000 + train_products}
    sizes = {"train": train_products, "validation": validation_products}
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "validation"):
            write_synthetic(tmp / f"fashiongen_{split}.h5", sizes[split], poses_per_product,
                            derive_seed(seed, split), first_product_id=first_ids[split])
    return {split: out_dir / f"fashiongen_{split}.h5" for split in sizes}
