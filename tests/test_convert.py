"""`fashiondiff convert` on real files: a shop folder of photos in every mode and size, a broken
one, a truncated one, and captions files (CSV, JSON Lines, COCO) with every kind of bad row; the
result read back by the pipeline's own reader and extraction."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import repo_params
from PIL import Image

from fashiondiff.data.convert import REPORT_LINES, convert, fashiongen_pixels, own_product_id, to_latin1
from fashiondiff.data.extract import extract
from fashiondiff.data.fashiongen import FashionGen
from fashiondiff.errors import PipelineError
from fashiondiff.processes import project_env

WHITE = (255, 255, 255)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # EXIF: the stored picture is shown turned 90 degrees clockwise

# The shop's captions.csv (line 1 is the header), what each line becomes, and the rows kept.
CAPTIONS_CSV = """file,caption,name,category,product_id
rotated.jpg,Red and blue shirt,,SHIRTS,7
big.jpg,"Wide scarf, red",Red scarf,ACCESSORIES,7
rgba.png,Green half,,,
palette.png,Red square on a frame,,,
shoes/missing.jpg,Missing shoe,,,
tiny.png,   ,,,
tiny.png,Blue strip,,,
rgba.png,Green again,,,
corrupt.jpg,Noise,,,
grey.png,Robe été — café,Kabát ő 東,DRESSES,12
truncated.jpg,Cut short,,,
cmyk.jpg,"Two-line
caption",,,
grey16.png,Grey sixteen,,,x1
grey16.png,Grey sixteen,,,
grey.png,Grey, plain,,,
"""
SKIPPED = {  # line -> the reason's beginning
    6: "missing file shoes/missing.jpg",
    7: "empty caption",
    9: "duplicate file rgba.png (first at line 4)",
    10: "unreadable image corrupt.jpg (not an image Pillow knows)",
    12: "unreadable image truncated.jpg (image file is truncated",
    15: "bad product_id 'x1' (not an integer)",
    17: "bad row (6 cells, the header 5: quote a caption with a comma)",
}
KEPT = ["rotated.jpg", "big.jpg", "rgba.png", "palette.png", "tiny.png", "grey.png", "cmyk.jpg", "grey16.png"]


def _jpeg(image: Image.Image, path: Path, **save) -> None:
    image.save(path, format="JPEG", quality=95, **save)


def _make_photos(folder: Path) -> None:
    """One photo of each kind the rule must handle; none of them square unless said."""
    folder.mkdir(parents=True)
    stored = Image.new("RGB", (120, 60), RED)  # left half red, right half blue, as stored
    stored.paste(BLUE, (60, 0, 120, 60))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    _jpeg(stored, folder / "rotated.jpg", exif=exif.tobytes())
    _jpeg(Image.new("RGB", (900, 400), (200, 40, 40)), folder / "big.jpg")
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))  # left half fully transparent black
    rgba.paste((*GREEN, 255), (50, 0, 100, 100))
    rgba.save(folder / "rgba.png")
    palette = Image.new("P", (50, 50), 0)  # colour 0 (transparent) frames colour 1 (red)
    palette.putpalette([0, 0, 0, *RED] + [0] * 762)
    palette.paste(1, (10, 10, 40, 40))
    palette.save(folder / "palette.png", transparency=0)
    Image.new("L", (64, 64), 100).save(folder / "grey.png")
    Image.new("RGB", (30, 70), BLUE).save(folder / "tiny.png")
    _jpeg(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(folder / "grey16.png")  # 32896 / 257 = 128
    (folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    noisy = io.BytesIO()
    _jpeg(Image.effect_noise((300, 300), 60).convert("RGB"), noisy)
    (folder / "truncated.jpg").write_bytes(noisy.getvalue()[: len(noisy.getvalue()) // 2])


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shop")
    _make_photos(root / "photos")
    (root / "captions.csv").write_text(CAPTIONS_CSV, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def converted(shop, tmp_path_factory):
    """(the result, its stderr) of converting the shop with two worker processes."""
    out = tmp_path_factory.mktemp("converted") / "shop.h5"
    capture = io.StringIO()
    stderr, sys.stderr = sys.stderr, capture
    try:
        done = convert(shop / "photos", shop / "captions.csv", out, workers=2)
    finally:
        sys.stderr = stderr
    return done, capture.getvalue()


def _rows(path: Path):
    with FashionGen(path) as data:
        return data.read(0, data.n_rows)


def _close(pixel, colour, tolerance: int = 6) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour)) <= tolerance))


def test_the_good_rows_in_order_with_their_text_and_products(converted, shop):
    done, _ = converted
    rows = _rows(done.out)
    assert (done.rows, len(rows), done.products) == (8, 8, 7)
    assert rows.images.shape == (8, 256, 256, 3) and rows.images.dtype == np.uint8
    assert rows.text["description"] == [
        "Red and blue shirt",
        "Wide scarf, red",
        "Green half",
        "Red square on a frame",
        "Blue strip",
        "Robe été - café",
        "Two-line\ncaption",
        "Grey sixteen",
    ]
    assert rows.text["name"] == [
        "Red and blue shirt",
        "Red scarf",
        "Green half",
        "Red square on a frame",
        "Blue strip",
        "Kabát o ?",
        "Two-line\ncaption",
        "Grey sixteen",
    ]
    assert rows.text["category"] == ["SHIRTS", "ACCESSORIES", "", "", "", "DRESSES", "", ""]
    assert rows.text["pose"] == [""] * 8
    own = [own_product_id(f) for f in KEPT]
    assert list(rows.product_ids) == [7, 7, own[2], own[3], own[4], 12, own[6], own[7]]
    assert done.replaced == 1


def test_every_bad_row_is_reported_by_line_with_its_reason(converted):
    done, stderr = converted
    assert stderr.startswith("skipped 7 of 15 rows of captions.csv (2 unreadable image, 1 missing file, ")
    reported = [line.strip() for line in stderr.splitlines() if line.startswith("  captions.csv line")]
    assert [int(line.split()[2].rstrip(":")) for line in reported] == sorted(SKIPPED)
    for line, reason in zip(reported, SKIPPED.values()):
        assert line.split(": ", 1)[1].startswith(reason), line
    assert f"full list: {done.skipped_list}" in stderr
    with open(done.skipped_list, newline="") as handle:
        listed = list(csv.DictReader(handle))
    assert [r["where"] for r in listed] == [f"line {n}" for n in SKIPPED]
    assert all(r["reason"].startswith(reason) for r, reason in zip(listed, SKIPPED.values()))
    assert (listed[0]["file"], listed[-1]["file"]) == ("shoes/missing.jpg", "grey.png")


def test_pictures_follow_the_one_rule(converted):
    images = _rows(converted[0].out).images
    rotated, big, rgba, palette, tiny, grey, cmyk, grey16 = images
    # EXIF applied: stored 120x60 left red / right blue shows as 60x120, red on top; padded left and right
    assert _close(rotated[60, 128], RED) and _close(rotated[200, 128], BLUE)
    assert _close(rotated[128, 30], WHITE, 0) and _close(rotated[128, 225], WHITE, 0)
    # 900x400 -> 256x114 centred: rows 71..184 hold the photo, white above and below
    assert _close(big[70, 128], WHITE, 0) and _close(big[71, 128], (200, 40, 40)) and _close(big[184, 5], (200, 40, 40))
    assert _close(big[185, 128], WHITE, 0)
    # transparency -> white
    assert _close(rgba[128, 50], WHITE, 0) and _close(rgba[128, 200], GREEN, 1)
    assert _close(palette[5, 5], WHITE, 0) and _close(palette[128, 128], RED, 1)
    # 30x70 enlarged to 110x256: columns 73..182, white beside
    blue_columns = np.flatnonzero(np.all(tiny[128] == BLUE, axis=1))
    assert (blue_columns[0], blue_columns[-1]) == (73, 182) and _close(tiny[128, 72], WHITE, 0)
    assert np.all(grey == 100)
    assert _close(cmyk[128, 128], RED, 8)
    assert np.all(grey16 == 128)


def test_the_rule_on_its_own():
    """A square RGB photo is only resized (a flat colour stays exact); a fully transparent one is white."""
    square = Image.new("RGB", (512, 512), (10, 20, 30))
    assert np.all(fashiongen_pixels(square) == (10, 20, 30))
    la = Image.new("LA", (20, 10), (0, 0))
    assert np.all(fashiongen_pixels(la) == 255)


def test_latin1_rule():
    assert to_latin1("Robe été — café") == "Robe été - café"
    assert to_latin1("“Ő” ﬁne… 東") == '"O" fine... ?'
    assert to_latin1("Cre\u0301pe") == "Crépe"  # decomposed (macOS) text is composed first
    assert to_latin1("q\u0307 Ǆ") == "q DZ"  # an accent with no composed letter is dropped


def test_same_inputs_give_the_same_bytes_with_or_without_workers(converted, shop, tmp_path, capsys):
    time.sleep(max(0.0, converted[0].out.stat().st_mtime + 1.1 - time.time()))  # timestamps would differ
    again = convert(shop / "photos", shop / "captions.csv", tmp_path / "again.h5", workers=0)
    assert again.out.read_bytes() == converted[0].out.read_bytes()
    assert again.skipped_list.read_bytes() == converted[0].skipped_list.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["again.h5", "again.h5.skipped.csv"]  # no temp file left


def test_json_lines_numbered_by_line_and_a_long_report_cut(shop, tmp_path, capsys):
    lines = [
        json.dumps({"file": "grey.png", "caption": "Grey dress", "category": "DRESSES", "product_id": 3}),
        "",
        "{not json",
        json.dumps(["a list"]),
        *(json.dumps({"file": f"gone/{k}.jpg", "caption": "x"}) for k in range(25)),
        json.dumps({"File": "tiny.png", "Caption": "Blue strip", "product_id": "3.0"}),
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    done = convert(shop / "photos", captions, tmp_path / "out.h5", workers=0)
    rows = _rows(done.out)
    assert rows.text["description"] == ["Grey dress", "Blue strip"] and list(rows.product_ids) == [3, 3]
    err = capsys.readouterr().err
    assert "captions.jsonl line 3: bad row (not JSON: " in err
    assert "captions.jsonl line 4: bad row (not a JSON object)" in err
    assert "captions.jsonl line 5: missing file gone/0.jpg" in err
    assert f"... and {27 - REPORT_LINES} more" in err and "gone/24.jpg" not in err
    assert len(done.skipped) == 27 and len(done.skipped_list.read_text().splitlines()) == 28


def test_coco_captions_take_each_image_s_first_caption(shop, tmp_path, capsys):
    coco = {
        "images": [
            {"id": 10, "file_name": "rgba.png"},
            {"id": 20, "file_name": "grey.png"},
            {"id": 30, "file_name": "tiny.png"},
        ],
        "annotations": [
            {"image_id": 20, "caption": "A grey square"},
            {"image_id": 10, "caption": "Half green"},
            {"image_id": 20, "caption": "A second caption"},
            {"image_id": 99, "caption": "nobody"},
        ],
    }
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(coco))
    done = convert(shop / "photos", captions, tmp_path / "coco.h5", workers=0)
    rows = _rows(done.out)
    assert rows.text["description"] == ["Half green", "A grey square"] == rows.text["name"]
    assert list(rows.product_ids) == [own_product_id("rgba.png"), own_product_id("grey.png")]
    assert "captions.json image 3 (id 30): empty caption (no annotation has image_id 30)" in capsys.readouterr().err


def test_the_converted_file_goes_through_extraction(converted, tmp_path):
    data = repo_params().data
    summary = extract(converted[0].out, tmp_path / "extracted", data.caption, chunk_size=3, workers=0)
    table = pd.read_parquet(tmp_path / "extracted" / "captions.parquet")
    assert summary["rows"] == 8 and summary["dropped"] == 0
    assert list(table["caption"])[:2] == ["Red and blue shirt", "Red scarf"]
    assert list(table["category"])[:2] == ["SHIRTS", "ACCESSORIES"] and len(set(table["product_id"])) == 7
    with Image.open(tmp_path / "extracted" / table["image"][5]) as png:
        assert png.size == (256, 256) and png.mode == "RGB"


def _cli(*args, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fashiondiff", "convert", *map(str, args)],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
        **popen,
    )


def test_the_command_line(shop, tmp_path):
    out = tmp_path / "cli" / "shop.h5"
    done = _cli("--images", shop / "photos", "--captions", shop / "captions.csv", "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 8 rows, 7 products, 7 rows skipped" in done.stdout
    assert "1 rows had characters outside latin-1" in done.stdout
    assert "captions.csv line 9: duplicate file rgba.png (first at line 4)" in done.stderr
    assert out.is_file() and (tmp_path / "cli" / "shop.h5.skipped.csv").is_file()
    wrong = _cli("--images", shop / "photos", "--captions", shop / "captions.csv", "--out", tmp_path / "shop.txt")
    assert wrong.returncode == 1 and "error: --out " in wrong.stderr and "ending in .h5" in wrong.stderr


def test_no_good_row_fails_with_one_line_and_writes_nothing(shop, tmp_path):
    (tmp_path / "bad.csv").write_text("file,caption\nnothere.jpg,Lost\ngrey.png,\n")
    done = _cli("--images", shop / "photos", "--captions", tmp_path / "bad.csv", "--out", tmp_path / "bad.h5")
    assert done.returncode == 1
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: {tmp_path / 'bad.csv'}: no usable row, all 2 skipped (1 missing file, "
        f"1 empty caption); nothing written"
    ]
    assert "bad.csv line 2: missing file nothere.jpg" in done.stderr
    (tmp_path / "broken.csv").write_text("file,caption\ncorrupt.jpg,Noise\ntruncated.jpg,Cut\n")
    with pytest.raises(PipelineError, match="all 2 skipped \\(2 unreadable image\\)"):
        convert(shop / "photos", tmp_path / "broken.csv", tmp_path / "broken.h5", workers=0)
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "broken.csv"]  # no output, no list, no temp file


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("captions.txt", "file,caption\n", "unknown captions format '.txt': give a .csv, a .jsonl"),
        ("captions.csv", "path,text\na.jpg,b\n", "CSV header (path, text) lacks file, caption"),
        ("captions.csv", "file,caption\n", "no rows; nothing written"),
        ("captions.csv", "file,caption\na.jpg,caf\xe9\n".encode("latin-1"), "line 2: not UTF-8 (byte 0xe9"),
        ("captions.json", '[{"file": "a.jpg"}]', "not COCO captions"),
    ],
)
def test_a_captions_file_it_cannot_read_fails_with_one_line(shop, tmp_path, name, text, words):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(PipelineError) as err:
        convert(shop / "photos", path, tmp_path / "out.h5", workers=0)
    assert words in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "out.h5").exists()


def test_sigterm_leaves_no_output_and_no_temp_file(tmp_path):
    """A stopped run (Slurm, Kubernetes, kill) removes its temporary file and leaves ``--out`` untouched."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.effect_noise((1600, 1600), 60).convert("RGB").save(photos / "0.png")
    for k in range(1, 300):
        os.link(photos / "0.png", photos / f"{k}.png")
    (tmp_path / "captions.csv").write_text("file,caption\n" + "".join(f"{k}.png,noise {k}\n" for k in range(300)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fashiondiff",
            "convert",
            "--images",
            str(photos),
            "--captions",
            str(tmp_path / "captions.csv"),
            "--out",
            str(tmp_path / "out.h5"),
            "--workers",
            "1",
        ],
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".out.h5.tmp-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM" in err
    assert sorted(os.listdir(tmp_path)) == ["captions.csv", "photos"]


FORK_STOP = """
import os, runpy, signal, sys

def after_fork():  # only once convert's handler is in: the SIGTERM's exception is raised in here
    if callable(signal.getsignal(signal.SIGTERM)):
        os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(3):
        pass

os.register_at_fork(after_in_parent=after_fork)
sys.argv = ["fashiondiff", *sys.argv[1:]]
runpy.run_module("fashiondiff", run_name="__main__")
"""


def test_sigterm_while_the_decoders_start_stops_it_all_the_same(shop, tmp_path):
    """A SIGTERM during the fork of a decoding process: Python drops the exception it raises there;
    convert stops at its next batch, with its one line and no output, instead of running to its end."""
    args = ["convert", "--images", shop / "photos", "--captions", shop / "captions.csv"]
    result = subprocess.run(
        [sys.executable, "-c", FORK_STOP, *map(str, args), "--out", str(tmp_path / "out.h5"), "--workers", "1"],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 143 and result.stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM", (
        result.stdout + result.stderr
    )
    assert "Exception ignored" not in result.stderr and os.listdir(tmp_path) == []
