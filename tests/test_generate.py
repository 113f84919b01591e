"""The `fashiondiff generate` command, run as a user would: subprocesses on tiny model folders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashiondiff.processes import project_env

FAST = ["--steps", "2", "--prior-steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    root = tmp_path_factory.mktemp("generate")
    texts = ["black leather mini skirt", "white cotton shirt", "blue denim jacket"] * 4
    save_pipelines(build_tiny(texts, TinySpec(clip_image_size=32, clip_patch_size=16)), root / "models")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "shirt.png")
    (root / "broken.png").write_text("not an image")
    return root


def start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fashiondiff", *args],
        cwd=cwd,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return finish(start(*args, cwd=cwd))


# The three generating runs start together (each spends most of its time importing torch).
RUNS = {
    "text": ["black leather mini skirt", "--model", "models", "--out", "out.png", "--seed", "3"],
    "image": [
        "black leather mini skirt",
        "--prior",
        "models/prior",
        "--decoder",
        "models/decoder",
        "--image",
        "shirt.png",
        "--strength",
        "0.6",
        "--num-images",
        "2",
        "--out",
        "edits",
    ],
    "mix": [
        "a skirt",
        "--model",
        "models",
        "--mix",
        "white cotton shirt:0.3",
        "--mix",
        "shirt.png:0.3",
        "--prompt-weight",
        "0.4",
        "--out",
        "mix.png",
    ],
}


@pytest.fixture(scope="module")
def runs(models) -> dict[str, subprocess.CompletedProcess]:
    started = {name: start("generate", *args, *FAST, cwd=models) for name, args in RUNS.items()}
    return {name: finish(process) for name, process in started.items()}


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr


def test_help_lists_generate(tmp_path):
    result = cli("--help", cwd=tmp_path)
    ok(result)
    assert "generate" in result.stdout


@pytest.mark.slow
def test_text_to_image(models, runs):
    result = runs["text"]
    ok(result)
    with Image.open(models / "out.png") as im:
        assert im.format == "PNG" and im.size == (64, 64)
    assert result.stdout.strip() == "out.png"


@pytest.mark.slow
def test_image_and_text_to_several_images(models, runs):
    ok(runs["image"])
    files = sorted(p.name for p in (models / "edits").iterdir())
    assert files == ["seed-0.beside.png", "seed-0.png", "seed-1.beside.png", "seed-1.png"]
    assert runs["image"].stdout.split() == [
        f"edits/{name}" for name in ("seed-0.png", "seed-0.beside.png", "seed-1.png", "seed-1.beside.png")
    ]
    with Image.open(models / "edits" / "seed-0.png") as a, Image.open(models / "edits" / "seed-1.png") as b:
        assert a.size == (64, 64) and not np.array_equal(np.asarray(a), np.asarray(b))
    with Image.open(models / "edits" / "seed-0.beside.png") as beside:  # the photo | the edit, titled
        assert beside.width > 2 * 64 and beside.height > 64


@pytest.mark.slow
def test_mix_of_text_and_image(models, runs):
    ok(runs["mix"])
    with Image.open(models / "mix.png") as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["skirt", "--model", "no/such/models"], "no such model folder"),
        (["skirt", "--model", "models", "--image", "broken.png"], "cannot read image"),
        (["skirt", "--model", "models", "--image", "missing.png"], "no such image"),
        (["   ", "--model", "models"], "empty prompt"),
    ],
)
def test_clear_errors(models, args, expected):
    result = cli("generate", *args, "--out", "never.png", cwd=models)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not (models / "never.png").exists()
