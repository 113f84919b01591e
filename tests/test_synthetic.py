"""The synthetic writer: exact FashionGen layout, determinism, pictures that follow the text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import params_tree, replaced
from PIL import Image

from fashiondiff.config.standin import SyntheticParams
from fashiondiff.errors import PipelineError
from fashiondiff.processes import project_env
from fashiondiff.standin import generic, synthetic
from fashiondiff.standin.synthetic import (
    COLOURS,
    GARMENTS,
    Pose,
    Product,
    render,
    synthesize,
    write_synthetic,
)

REPO = Path(__file__).resolve().parents[1]
TEXT_KEYS = {
    "input_name",
    "input_description",
    "input_category",
    "input_subcategory",
    "input_pose",
    "input_gender",
    "input_composition",
    "input_concat_description",
    "input_department",
    "input_season",
    "input_brand",
}


def test_layout_is_exactly_fashiongens(synthetic_h5):
    with h5py.File(synthetic_h5, "r") as f:
        assert set(f) == TEXT_KEYS | {"input_image", "input_productID", "input_msrpUSD", "index", "index_2"}
        n = 12
        assert f["input_image"].dtype == np.uint8 and f["input_image"].shape == (n, 256, 256, 3)
        for key in TEXT_KEYS:
            assert f[key].dtype.kind == "S" and f[key].shape == (n, 1), key
        assert f["input_productID"].dtype.kind == "i" and f["input_productID"].shape == (n, 1)
        assert f["input_msrpUSD"].dtype == np.float32 and f["input_msrpUSD"].shape == (n, 1)
        assert f["index"].shape == (n, 1) and f["index_2"].shape == (n,)
        ids = f["input_productID"][:, 0]
        assert len(set(ids)) == 6 and all(ids[::2] == ids[1::2])  # 2 poses per product
        poses = [p.decode() for p in f["input_pose"][:, 0]]
        assert poses[:2] == ["id_gridfs_1", "id_gridfs_2"]
        texts = [b"".join(f[k][:, 0]) for k in ("input_name", "input_description")]
        assert all(t.decode("latin-1") for t in texts)


def test_same_seed_gives_identical_datasets(tmp_path):
    a = write_synthetic(tmp_path / "a.h5", 3, 2, seed=7)
    b = write_synthetic(tmp_path / "b.h5", 3, 2, seed=7)
    c = write_synthetic(tmp_path / "c.h5", 3, 2, seed=8)
    with h5py.File(a) as fa, h5py.File(b) as fb, h5py.File(c) as fc:
        for key in fa:
            assert fa[key].dtype == fb[key].dtype
            assert np.array_equal(fa[key][()], fb[key][()]), key
        assert not np.array_equal(fa["input_image"][()], fc["input_image"][()])
    assert a.read_bytes() == b.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "c.h5"]  # no temp files left


def test_text_matches_garment_and_poses_keep_identity(synthetic_h5):
    by_sub = {g.subcategory: g for g in GARMENTS}
    with h5py.File(synthetic_h5) as f:
        names = [v.decode("latin-1") for v in f["input_name"][:, 0]]
        subs = [v.decode() for v in f["input_subcategory"][:, 0]]
        descriptions = [v.decode("latin-1") for v in f["input_description"][:, 0]]
        images = f["input_image"][()]
    for name, sub, description in zip(names, subs, descriptions):
        garment = by_sub[sub]
        assert name.lower().endswith(garment.noun), (name, sub)
        assert name.split()[0].lower() in COLOURS
        assert description.lower().startswith(garment.noun)
    for a in range(0, 12, 2):  # two poses of one product: same text, different framing
        assert names[a] == names[a + 1]
        assert not np.array_equal(images[a], images[a + 1])


def _plain(garment, colour) -> np.ndarray:
    pose = Pose(0.0, 0.0, 1.0, 0.0, False, (245, 245, 245))
    return render(Product(1, garment, colour, "plain", {}, 0), pose)


def test_pictures_follow_colour_and_garment_and_survive_64px():
    masks = {}
    for garment in GARMENTS:
        for colour in ("red", "navy", "yellow"):
            picture = _plain(garment, colour)
            share = np.all(picture == COLOURS[colour], axis=-1).mean()
            assert share > 0.12, (garment.noun, colour, share)  # large and in its colour
            small = np.asarray(Image.fromarray(picture).resize((64, 64), Image.BICUBIC), float)
            near = np.abs(small - COLOURS[colour]).sum(-1) < 40
            assert near.mean() > 0.10, (garment.noun, colour)
        masks[garment.noun] = np.any(picture != 245, axis=-1)
    nouns = list(masks)
    for i, a in enumerate(nouns):  # silhouettes are distinct
        for b in nouns[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.9, (a, b, iou)


def test_materials_are_drawn_differently():
    garment = GARMENTS[0]
    pose = Pose(0.0, 0.0, 1.0, 0.0, False, (245, 245, 245))
    pictures = {m: render(Product(1, garment, "blue", m, {}, 0), pose) for m in synthetic.MATERIALS}
    garment_px = np.any(pictures["plain"] != 245, axis=-1)
    for i, a in enumerate(synthetic.MATERIALS):
        for b in synthetic.MATERIALS[i + 1 :]:
            diff = np.abs(pictures[a].astype(int) - pictures[b]).sum(-1)[garment_px]
            assert diff.mean() > 15, (a, b)


def sizes(train=3, validation=2, poses=1, generic_train=2, generic_validation=1) -> SyntheticParams:
    return SyntheticParams(
        train_products=train,
        validation_products=validation,
        poses_per_product=poses,
        generic_train_items=generic_train,
        generic_validation_items=generic_validation,
    )


def test_synthesize_four_files_with_disjoint_products(tmp_path):
    paths = synthesize(tmp_path / "out", sizes(), seed=0)
    assert (
        sorted(p.name for p in (tmp_path / "out").iterdir())
        == sorted(synthetic.FILES)
        == sorted(p.name for p in paths.values())
    )
    ids = {}
    for name, path in paths.items():
        with h5py.File(path) as f:
            ids[name] = set(f["input_productID"][:, 0])
            names = [v.decode("latin-1") for v in f["input_name"][:, 0]]
        assert names == [n.lower() for n in names] if name.startswith("generic") else names[0][0].isupper()
    assert [len(ids[n]) for n in synthetic.FILES] == [3, 2, 2, 1]
    assert sum(map(len, ids.values())) == len(set().union(*ids.values()))  # disjoint across all four
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_generic_domain_shares_words_not_looks():
    """Objects in a room: the catalogue's colours and materials, none of its nouns, another setting."""
    rng = np.random.default_rng(0)
    things = [generic.thing(rng, i) for i in range(200)]
    nouns = {g.noun for g in GARMENTS}
    assert {t.colour for t in things} == set(COLOURS) and {t.material for t in things} == set(synthetic.MATERIALS)
    assert not {t.kind.noun for t in things} & nouns
    for t in things:
        assert t.text["input_name"].split()[0] == t.colour and t.text["input_name"].endswith(t.kind.noun)
    view = generic.View(synthetic.Placement(0.0, 0.0, 0.9, 0.0, False))
    pictures = {}
    for kind in generic.KINDS:
        thing = generic.Thing(1, kind, "red", "plain", {}, 0)
        picture = generic.render(thing, view, synthetic.paint_swatch("red", "plain", 0))
        assert np.all(picture[-5:, :, :] == generic.FLOOR, axis=-1).mean() > 0.5  # a floor under it
        red = np.all(picture == COLOURS["red"], axis=-1)
        assert red.mean() > 0.04, kind.noun  # large enough to see at 64 px
        pictures[kind.noun] = red
    nouns = list(pictures)
    for i, a in enumerate(nouns):  # silhouettes are distinct
        for b in nouns[i + 1 :]:
            iou = (pictures[a] & pictures[b]).sum() / (pictures[a] | pictures[b]).sum()
            assert iou < 0.9, (a, b, iou)
    catalogue = _plain(GARMENTS[0], "red")
    assert not np.all(catalogue[-5:] == generic.FLOOR, axis=-1).any()  # the studio has no floor


def test_a_wall_always_stands_out_from_the_object():
    for colour, rgb in COLOURS.items():
        wall = generic.wall_for(rgb)
        assert sum(abs(a - b) for a, b in zip(wall, rgb)) >= 150, colour


def test_stage_writes_the_four_files(tmp_path):
    tree = params_tree(
        **{
            "seed": 3,
            "standin.synthetic": {
                "train_products": 2,
                "validation_products": 1,
                "poses_per_product": 2,
                "generic_train_items": 2,
                "generic_validation_items": 1,
            },
        }
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    done = subprocess.run(
        [sys.executable, str(REPO / "stages/synthesize.py"), "raw"],
        cwd=tmp_path,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "raw")) == sorted(synthetic.FILES)


@pytest.mark.parametrize("which", ["validation_products", "generic_train_items", "poses_per_product"])
def test_synthesize_rejects_empty_sizes_naming_the_param(tmp_path, which):
    bad = replaced(sizes(), **{which: 0})
    with pytest.raises(PipelineError, match=f"synthetic.{which}"):
        synthesize(tmp_path / "out", bad, seed=0)
    assert os.listdir(tmp_path) == []
