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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from fashiondiff.errors import PipelineError
from fashiondiff.io import atomic_dir
from fashiondiff.standin import generic
from fashiondiff.standin.drawing import (  # noqa: F401  (COLOURS, MATERIALS: the catalogue's words too)
    COLOURS,
    DENIM_COLOURS,
    MATERIALS,
    SIZE,
    Placement,
    draw_shape,
    paint_swatch,
    shade,
    to_pixels,
)

WRITE_CHUNK = 128  # rows rendered and written at a time: memory stays ~25 MB

TEXT_KEYS = (
    "input_name", "input_description", "input_category", "input_subcategory", "input_pose",
    "input_gender", "input_composition", "input_concat_description", "input_department",
    "input_season", "input_brand",
)

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
    """A catalogue photo's framing: the garment's placement and the studio's grey."""

    dx: float
    dy: float
    scale: float
    angle: float  # degrees
    flip: bool
    background: tuple[int, int, int]

    @property
    def placement(self) -> Placement:
        return Placement(self.dx, self.dy, self.scale, self.angle, self.flip)


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


def swatch_of(product) -> Image.Image:
    """The product's colour and material as a full-frame swatch (its silhouette masks it)."""
    return paint_swatch(product.colour, product.material, product.pattern_seed)


def render(product: Product, pose: Pose, swatch: Image.Image | None = None) -> np.ndarray:
    """The (256, 256, 3) uint8 catalogue photo of ``product`` in ``pose``: a studio shot."""
    swatch = swatch or swatch_of(product)
    shape, place = product.garment.shape, pose.placement
    img = Image.new("RGB", (SIZE, SIZE), pose.background)
    draw = ImageDraw.Draw(img)
    shadow, to_px = shade(pose.background, 0.9), to_pixels(place)
    for poly in shape["body"]:  # soft drop shadow
        draw.polygon([(x + 5, y + 5) for x, y in to_px(poly)], fill=shadow)
    draw_shape(img, shape, product.colour, swatch, place, cut_fill=pose.background)
    return np.asarray(img, dtype=np.uint8)


# --- the two domains ---------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """What a synthetic file depicts: how to draw up an item (its text and look), a view of
    it (a pose), and the picture of an item in a view."""

    name: str
    item: Callable[[np.random.Generator, int], object]  # (rng, product id) -> .text, .product_id, ...
    view: Callable[[np.random.Generator, int], object]  # (rng, view index) -> pose
    render: Callable[[object, object, Image.Image], np.ndarray]  # (item, pose, swatch) -> picture


CATALOGUE = Domain("catalogue", _product, _pose, render)
GENERIC = Domain("generic", generic.thing, generic.view, generic.render)


# --- the HDF5 file ------------------------------------------------------------------

def _catalogue(n_products: int, poses_per_product: int, seed: int, first_product_id: int,
               domain: Domain = CATALOGUE):
    """All items and, row by row, (item index, view index, pose): decided up front."""
    rng = np.random.default_rng(seed)
    products = [domain.item(rng, first_product_id + i) for i in range(n_products)]
    rows = [(p, k, domain.view(rng, k)) for p in range(n_products) for k in range(poses_per_product)]
    return products, rows


def _bytes_column(values: list[str]) -> np.ndarray:
    encoded = [v.encode("latin-1") for v in values]
    width = max(1, max(len(b) for b in encoded))
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def _write(path: Path, products: list, rows: list, domain: Domain) -> None:
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
                    swatches = {p: swatch_of(products[p])}  # rows are grouped by item
                pictures[i] = domain.render(products[p], pose, swatches[p])
            images[start:start + len(block)] = pictures


def _msrp(product) -> float:
    digest = hashlib.blake2b(str(product.pattern_seed).encode(), digest_size=4).digest()
    return float(60 + int.from_bytes(digest, "big") % 2400)


def write_synthetic(path: str | os.PathLike, n_products: int, poses_per_product: int, seed: int,
                    *, first_product_id: int = 100_000, domain: Domain = CATALOGUE) -> Path:
    """Write a FashionGen-layout HDF5 file of ``n_products`` x ``poses_per_product`` rows
    of ``domain`` (the catalogue's garments by default, or ``GENERIC``'s objects).

    Deterministic: the same arguments give byte-identical datasets. Product ids are
    ``first_product_id, first_product_id + 1, ...``. Written to a temporary file
    beside ``path`` and renamed, so ``path`` is never half-written.
    """
    if n_products < 1 or poses_per_product < 1:
        raise ValueError("n_products and poses_per_product must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    products, rows = _catalogue(n_products, poses_per_product, seed, first_product_id, domain)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # h5py creates it, usual mode
    try:
        _write(tmp, products, rows, domain)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def derive_seed(seed: int, name: str) -> int:
    """A stable sub-seed for ``name`` (e.g. "train"), independent of Python's hash()."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


FILES = {  # file name -> (domain, split)
    "fashiongen_train.h5": (CATALOGUE, "train"), "fashiongen_validation.h5": (CATALOGUE, "validation"),
    "generic_train.h5": (GENERIC, "train"), "generic_validation.h5": (GENERIC, "validation"),
}


def synthesize(out_dir: str | os.PathLike, sizes, seed: int) -> dict[str, Path]:
    """Write the four files of ``FILES`` into ``out_dir``, atomically.

    ``sizes`` is ``params.standin.synthetic``. Every file has its own seed derived from
    ``seed``; product ids are disjoint across all four.
    """
    counts = {"fashiongen_train.h5": sizes.train_products, "fashiongen_validation.h5": sizes.validation_products,
              "generic_train.h5": sizes.generic_train_items,
              "generic_validation.h5": sizes.generic_validation_items}
    keys = dict(zip(counts, ("train_products", "validation_products", "generic_train_items",
                             "generic_validation_items")))
    for key, value in [*((keys[f], n) for f, n in counts.items()), ("poses_per_product", sizes.poses_per_product)]:
        if value < 1:
            raise PipelineError(f"params: standin.synthetic.{key} must be >= 1, got {value}")
    out_dir, first_id = Path(out_dir), 100_000
    with atomic_dir(out_dir) as tmp:
        for name, (domain, split) in FILES.items():
            salt = split if domain is CATALOGUE else f"{domain.name}-{split}"
            write_synthetic(tmp / name, counts[name], sizes.poses_per_product, derive_seed(seed, salt),
                            first_product_id=first_id, domain=domain)
            first_id += counts[name]
    return {name: out_dir / name for name in FILES}
