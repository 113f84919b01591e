"""Extraction: exact pixels and latin-1 text, dropped rows, and clean failures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from fashiondiff.data.extract import _Encoder, extract, make_caption
from fashiondiff.data.fashiongen import FashionGen, read_rows
from fashiondiff.errors import PipelineError
from fashiondiff.processes import project_env

REPO = Path(__file__).resolve().parents[1]


def _png(out: Path, row: int) -> np.ndarray:
    with Image.open(out / "images" / f"{row:07d}.png") as img:
        return np.asarray(img)


def test_round_trip_pixels_and_captions(synthetic_h5, tmp_path):
    out = tmp_path / "extracted"
    summary = extract(synthetic_h5, out, "{name}. {description}", chunk_size=5, workers=2)
    assert summary["rows"] == 12 and summary["products"] == 6 and summary["dropped"] == 0
    table = pd.read_parquet(out / "captions.parquet")
    assert {"row", "product_id", "pose", "category", "name", "description", "caption", "image"} <= set(table.columns)
    assert list(table["row"]) == list(range(12))
    with h5py.File(synthetic_h5) as f:
        images, ids = f["input_image"][()], f["input_productID"][:, 0]
    for rec in table.itertuples():
        assert np.array_equal(_png(out, rec.row), images[rec.row])
        assert (out / rec.image).is_file() and not Path(rec.image).is_absolute()
        assert rec.caption == f"{rec.name}. {rec.description}"
        assert rec.product_id == ids[rec.row]
    assert sorted(os.listdir(tmp_path)) == ["extracted"]  # no temp folder left


def test_latin1_text_round_trips_exactly(make_h5, tmp_path):
    src = make_h5(
        tmp_path / "latin.h5",
        n=3,
        input_name=[b"Jupe appliqu\xe9 ", b"Robe cr\xeape\x00\x00", b"  Plain  "],
        input_description=["Appliqué detailing.", "Lined in crêpe de chine.", ""],
        input_category=["SKIRTS", "DRESSES", "TOPS"],
    )
    extract(src, tmp_path / "out", "{name} ({category}): {description}", 2, workers=0)
    table = pd.read_parquet(tmp_path / "out" / "captions.parquet")
    assert list(table["name"]) == ["Jupe appliqué", "Robe crêpe", "Plain"]
    assert list(table["description"]) == ["Appliqué detailing.", "Lined in crêpe de chine.", ""]
    assert list(table["caption"]) == [
        "Jupe appliqué (SKIRTS): Appliqué detailing.",
        "Robe crêpe (DRESSES): Lined in crêpe de chine.",
        "Plain (TOPS)",
    ]


def test_blank_captions_fall_back_then_are_dropped(make_h5, tmp_path):
    src = make_h5(
        tmp_path / "blank.h5",
        n=4,
        input_name=["", "only a name", "", "  "],
        input_description=["", "", "only a description", "\x00"],
    )
    summary = extract(src, tmp_path / "out", "{description}", 3, workers=1)
    assert summary["dropped"] == 2 and summary["rows"] == 2
    table = pd.read_parquet(tmp_path / "out" / "captions.parquet")
    assert list(table["row"]) == [1, 2]
    assert list(table["caption"]) == ["only a name", "only a description"]
    assert sorted(os.listdir(tmp_path / "out" / "images")) == ["0000001.png", "0000002.png"]


def test_optional_keys_missing_and_no_product_id(make_h5, tmp_path, capsys):
    src = make_h5(tmp_path / "bare.h5", n=3, input_name=None, input_pose=None, input_productID=None)
    rows = read_rows(src, 1, 3, images=False)
    assert rows.images is None and list(rows.product_ids) == [1, 2]
    assert rows.text["name"] == ["", ""] and rows.text["description"][0] == "description 1"
    assert "warning:" in capsys.readouterr().err
    extract(src, tmp_path / "out", "{name}", 8, workers=0)  # falls back to the description
    table = pd.read_parquet(tmp_path / "out" / "captions.parquet")
    assert list(table["product_id"]) == [0, 1, 2] and table["caption"][0] == "description 0"


def test_caption_cleanup():
    fields = dict.fromkeys(["name", "description", "brand"], "")
    assert make_caption("{name}. {description}", {**fields, "description": "Red."}) == "Red."
    both = {**fields, "name": "A", "description": "b"}
    assert make_caption("{name}, {brand}, {description}", both) == "A, b"
    assert make_caption("{brand}", {**fields, "name": " x \n y "}) == "x y"


def _corrupt_last_chunk(path: Path) -> None:
    """Garble the bytes of the last compressed image chunk: the file opens, a late read fails."""
    with h5py.File(path, "r") as f:
        info = f["input_image"].id.get_chunk_info(f["input_image"].id.get_num_chunks() - 1)
    with open(path, "r+b") as handle:
        handle.seek(info.byte_offset)
        handle.write(b"\xff" * info.size)


def _malformed(kind: str, tmp_path: Path, make_h5, synthetic_h5) -> tuple[Path, str]:
    """A broken input file and the word its error message must contain."""
    path = tmp_path / f"{kind}.h5"
    if kind == "not_hdf5":
        path.write_text("row,caption\n1,hello\n")
        return path, "not an HDF5 file"
    if kind == "truncated":
        shutil.copy(synthetic_h5, path)
        os.truncate(path, path.stat().st_size // 2)
        return path, "truncated"
    if kind == "corrupt_chunk":
        pixels = np.zeros((6, 16, 16, 3), np.uint8)
        with h5py.File(path, "w") as f:
            f.create_dataset("input_image", data=pixels, chunks=(1, 16, 16, 3), compression="gzip")
            f.create_dataset("input_description", data=np.array([[b"d"]] * 6))
        _corrupt_last_chunk(path)
        return path, "input_image"
    cases = {
        "missing_image": ({"input_image": None}, "input_image"),
        "missing_description": ({"input_description": None}, "input_description"),
        "short_key": ({"input_name": ["a", "b", "c"]}, "input_name"),
        "float_image": ({"input_image": np.zeros((4, 16, 16, 3), np.float32)}, "input_image"),
        "grey_image": ({"input_image": np.zeros((4, 16, 16), np.uint8)}, "input_image"),
        "numeric_text": ({"input_season": np.zeros((4, 1))}, "input_season"),
        "empty": (
            {
                "input_image": np.zeros((0, 16, 16, 3), np.uint8),
                "input_name": [],
                "input_description": [],
                "input_pose": [],
                "input_productID": np.zeros((0, 1), int),
            },
            "empty",
        ),
    }
    datasets, word = cases[kind]
    return make_h5(path, **datasets), word


KINDS = [
    "not_hdf5",
    "truncated",
    "corrupt_chunk",
    "missing_image",
    "missing_description",
    "short_key",
    "float_image",
    "grey_image",
    "numeric_text",
    "empty",
]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_input_fails_cleanly(kind, tmp_path, make_h5, synthetic_h5):
    path, word = _malformed(kind, tmp_path, make_h5, synthetic_h5)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PipelineError) as err:
        extract(path, tmp_path / "out", "{name}", chunk_size=2, workers=2)
    message = str(err.value)
    assert "\n" not in message and path.name in message and word in message, message
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temp folder


def test_unknown_caption_field_names_the_param(synthetic_h5, tmp_path):
    with pytest.raises(PipelineError, match=r"data\.caption.*'\{colour\}'"):
        extract(synthetic_h5, tmp_path / "out", "{name} in {colour}", 4, 0)
    assert os.listdir(tmp_path) == []


def _stage(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages/extract.py"), *map(str, args)],
        cwd=REPO,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("kind", ["not_hdf5", "missing_description", "truncated"])
def test_stage_reports_one_line_and_exit_1(kind, tmp_path, make_h5, synthetic_h5):
    path, word = _malformed(kind, tmp_path, make_h5, synthetic_h5)
    before = sorted(os.listdir(tmp_path))
    done = _stage(path, tmp_path / "out")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and path.name in lines[0], lines
    assert word in lines[0] and "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_stage_succeeds_and_replaces_old_output(synthetic_h5, tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    done = _stage(synthetic_h5, out)
    assert done.returncode == 0, done.stderr
    assert "12 rows, 6 products, 0 dropped" in done.stdout
    assert len(os.listdir(out / "images")) == 12 and (out / "captions.parquet").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_reader_streams_in_chunks(synthetic_h5):
    with FashionGen(synthetic_h5) as data:
        sizes = [len(rows) for rows in data.chunks(5)]
        assert sizes == [5, 5, 2] and data.image_shape == (256, 256, 3)
        assert data.read(10, 99).images.shape == (2, 256, 256, 3)


def _children(pid: int) -> list[int]:
    """The encoder workers of ``pid``: its children (/proc/*/stat field 4 is the parent's pid)
    with its own command line, as forked workers have; a library's short-lived helper process
    (ctypes' `ldconfig -p`, say) is not one of them."""
    try:
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and (stat.parent / "cmdline").read_bytes() == own:
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


def test_a_killed_worker_fails_the_stage_within_seconds(make_h5, tmp_path):
    """kill -9 of a PNG encoder (as the OOM killer would): one-line error, exit 1, no outputs,
    no temp folder, within 10 s (multiprocessing.Pool used to wait forever)."""
    n = 4000  # 64x64 noise: a few seconds of encoding, time enough to kill a worker
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    h5 = make_h5(tmp_path / "big.h5", n=n, input_image=pixels)
    out = tmp_path / "out"
    stage = subprocess.Popen(
        [sys.executable, str(REPO / "stages/extract.py"), str(h5), str(out)],
        cwd=REPO,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    workers = yaml.safe_load((REPO / "params.yaml").read_text())["data"]["workers"]  # a fork pool starts all at once
    while len(_children(stage.pid)) < workers and time.monotonic() < deadline and stage.poll() is None:
        time.sleep(0.01)
    # Freeze the stage the moment its workers exist, so the kill lands with most of the rows
    # still to encode (a busy machine once let the stage finish first, and it rightly exited 0).
    assert stage.poll() is None, "the stage ended before it started a worker"
    os.kill(stage.pid, signal.SIGSTOP)  # not reaped yet (poll saw it running): a safe pid
    try:
        # A child forked to run another program (ctypes' ldconfig) has the stage's command line
        # until its exec: once frozen, the stage forks none, and such a child has exec'd by now.
        time.sleep(0.3)
        workers = _children(stage.pid)
        assert workers, "the stage started no worker"
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
    finally:
        os.kill(stage.pid, signal.SIGCONT)
    _, stderr = stage.communicate(timeout=30)
    assert time.monotonic() - killed < 10
    assert stage.returncode == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "died" in lines[0], stderr
    assert sorted(os.listdir(tmp_path)) == ["big.h5"]


def test_a_worker_that_died_between_tasks_fails_the_next_submit(synthetic_h5, tmp_path):
    """A worker killed after the last result was collected: the next task's submit, not only a
    pending result, fails with the one-line error (the executor raises on submit once broken)."""
    with pytest.raises(PipelineError, match="PNG encoder process died"):
        with _Encoder(Path(synthetic_h5), workers=1) as encoder:
            encoder.drain()
            encoder.submit((str(tmp_path), 0, 1, [0]))
            assert encoder.drain() == 1
            process = next(iter(encoder.pool._processes.values()))
            process.kill()
            process.join(10)
            deadline = time.monotonic() + 10
            while not encoder.pool._broken and time.monotonic() < deadline:
                time.sleep(0.01)
            encoder.submit((str(tmp_path), 1, 2, [0]))
            encoder.drain()


@pytest.mark.parametrize("workers", [0, 1])
def test_files_of_two_image_sizes_extract_in_one_process(make_h5, tmp_path, workers):
    """A process's reused pixel buffer follows the file's image size (a 16 px file after a
    32 px one, inline or in forked workers that inherit the parent's buffer)."""
    for size in (32, 16):
        pixels = np.random.default_rng(size).integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
        h5 = make_h5(tmp_path / f"{size}.h5", input_image=pixels)
        extract(h5, tmp_path / f"out{size}", "{name}", 4, workers=workers)
        for row in range(4):
            assert np.array_equal(np.asarray(Image.open(tmp_path / f"out{size}/images/{row:07d}.png")), pixels[row])
