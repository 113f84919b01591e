"""`make fullsize` (bench/fullsize.py) on the tiny model: the same code path, every real stage
in its own process, reports/fullsize.json complete (the full-size run itself is not a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fashiondiff.processes import project_env

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # every stage as a process: minutes


def test_fullsize_script_runs_every_stage_and_reports(tmp_path):
    report = tmp_path / "fullsize.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/fullsize.py"),
            "--tiny",
            "--products",
            "2",
            "--batch-size",
            "4",
            "--prompts",
            "2",
            "--steps",
            "4",
            "--work",
            str(tmp_path / "work"),
            "--report",
            str(report),
        ],
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    got = json.loads(report.read_text())
    assert list(got["stages"]) == [
        "extract@train",
        "extract@validation",
        "extract@generic",
        "embed@train",
        "embed@validation",
        "train_prior",
        "train_decoder",
        "evaluate",
        "generate text->image",
        "generate image+text->image",
    ]
    for name, stage in got["stages"].items():
        assert stage["exit"] == 0 and stage["seconds"] > 0 and stage["peak_rss_bytes"] > 0, name
    for kind in ("prior", "decoder"):
        assert got["stages"][f"train_{kind}"]["samples_per_s"] > 0
        model = got["models"][kind]
        assert 0 < model["trainable_parameters"] < model["parameters"]  # the documented subset
        assert model["optimizer_state_bytes"] == 8 * model["trainable_parameters"]
    assert got["cache"]["dtype"] == "float16" and got["cache"]["unique_captions"] < got["cache"]["images"]
    assert got["cache"]["bytes_per_image"] > 0
    assert not (tmp_path / "work").exists()  # the scratch folder goes unless --keep
