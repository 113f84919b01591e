"""Modules are cut where the stages are cut: the stale map from dvc.yaml's declared deps
(tools/stale_map.py) keeps commands, the web page, the MLflow UI view, tools, tests and
benchmarks out of every stage, the serving model in `register` only, the cache's reader
apart from its writer, and the training options out of every stage before training. (That
each stage imports exactly what it declares is tests/test_pipeline_e2e.py's audit.)"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from stale_map import after, stale_map  # noqa: E402

from fashiondiff.config.view import SECTIONS  # noqa: E402

MAP = stale_map(REPO)
TRAININGS = {"train_prior", "train_decoder"}
BEFORE_TRAINING = {"synthesize", "pretrain", "extract", "embed"}
TRAINING_SECTIONS = ("train", "prior", "decoder")


def stales(path: str) -> set[str]:
    return set(MAP[path])


def test_commands_page_ui_view_tools_tests_and_benchmarks_stale_no_stage():
    free = [f for f in MAP if f.startswith(("src/fashiondiff/commands/", "tools/", "tests/", "bench/"))]
    free += [
        "src/fashiondiff/__main__.py",
        "src/fashiondiff/processes.py",
        "src/fashiondiff/launch.py",
        "src/fashiondiff/serving/page.py",
        "src/fashiondiff/serving/studio.py",
    ]
    assert {"src/fashiondiff/commands/generate.py", "src/fashiondiff/commands/ui.py", "tests/conftest.py"} <= set(free)
    assert {f: MAP[f] for f in free if MAP[f]} == {}


def test_the_served_model_stales_register_only():
    for module in ("engine", "images", "pyfunc", "mlflow_model", "register", "registry"):
        assert stales(f"src/fashiondiff/serving/{module}.py") == {"register"}, module


def test_the_cache_reader_stales_the_trainings_not_embed():
    assert TRAININGS <= stales("src/fashiondiff/cache/reader.py")
    assert "embed" not in stales("src/fashiondiff/cache/reader.py")
    for writer in ("src/fashiondiff/embed/writer.py", "src/fashiondiff/embed/encoders.py"):
        assert "embed" in stales(writer) and not TRAININGS & stales(writer), writer


def test_each_model_s_loss_stales_its_own_training():
    assert "train_decoder" not in stales("src/fashiondiff/train/prior.py")
    assert "train_prior" not in stales("src/fashiondiff/train/decoder.py")
    assert stales("src/fashiondiff/sampling.py") == {"evaluate", "register"}
    assert stales("src/fashiondiff/tracking.py") == TRAININGS | {"evaluate", "register", "pretrain"}  # stage runs only


def test_the_stand_in_stales_no_real_stage():
    real = {"extract", "embed", "evaluate", "register"} | TRAININGS
    assert all(not real & stales(f) for f in MAP if f.startswith("src/fashiondiff/standin/"))


def test_a_training_option_reruns_the_trainings_and_what_follows_only():
    """A line added to config/train.py: the two trainings list it; evaluate and register read
    their outputs; nothing before training is touched (on real data: 260k images extracted and
    embedded again)."""
    module = "src/fashiondiff/config/train.py"
    assert {f"src/fashiondiff/config/{SECTIONS[s]}.py" for s in TRAINING_SECTIONS} == {module}
    assert stales(module) == TRAININGS
    assert stales(module) | after(stales(module), REPO) == TRAININGS | {"evaluate", "register"}
    assert not BEFORE_TRAINING & (stales(module) | after(stales(module), REPO))


def test_no_stage_before_training_lists_a_file_that_defines_a_training_option():
    """Any file defining a train.*, prior.* or decoder.* key: the module SECTIONS names, and any
    other that spells out such a section's model (a copy would bring the staleness back)."""
    defining = {f"src/fashiondiff/config/{SECTIONS[s]}.py" for s in TRAINING_SECTIONS}
    defining |= {
        f
        for f in MAP
        if f.startswith("src/")
        and any(
            name in (REPO / f).read_text() for name in ("class TrainParams", "class PriorParams", "class DecoderParams")
        )
    }
    assert all(TRAININGS <= after({s}, REPO) for s in ("extract", "embed"))  # before training, by the DAG
    assert {f: sorted(BEFORE_TRAINING & stales(f)) for f in defining if BEFORE_TRAINING & stales(f)} == {}


def test_formats_live_below_their_readers_nothing_outside_train_imports_it():
    """The LoRA adapter's format is models/adapter.py's: generate, serve and the served model read
    it without importing training. Only the stand-in's pre-training, which runs the loop, may."""
    imports_train = re.compile(r"^\s*(from fashiondiff\.train[ .]|import fashiondiff\.train)", re.MULTILINE)
    outside = [
        f
        for f in MAP
        if f.startswith("src/fashiondiff/")
        and imports_train.search((REPO / f).read_text())
        and not f.startswith(("src/fashiondiff/train/", "src/fashiondiff/standin/"))
    ]
    assert outside == []
    assert stales("src/fashiondiff/models/adapter.py") == TRAININGS  # sampling and serving import it lazily


def test_the_committed_map_is_current():
    done = subprocess.run([sys.executable, str(REPO / "tools/stale_map.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
