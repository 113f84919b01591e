"""Modules are cut where the stages are cut: the stale map from dvc.yaml's declared deps
(tools/stale_map.py) keeps commands, the web page, the MLflow UI view, tools, tests and
benchmarks out of every stage, the serving model in `register` only, and the cache's reader
apart from its writer. (That each stage imports exactly what it declares is
tests/test_pipeline_e2e.py's audit.)"""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from stale_map import stale_map  # noqa: E402

MAP = stale_map(REPO)
TRAININGS = {"train_prior", "train_decoder"}


def stales(path: str) -> set[str]:
    return set(MAP[path])


def test_commands_page_ui_view_tools_tests_and_benchmarks_stale_no_stage():
    free = [f for f in MAP if f.startswith(("src/fashiondiff/commands/", "tools/", "tests/", "bench/"))]
    free += ["src/fashiondiff/__main__.py", "src/fashiondiff/processes.py", "src/fashiondiff/serving/page.py",
             "src/fashiondiff/serving/studio.py"]
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


def test_the_committed_map_is_current():
    done = subprocess.run([sys.executable, str(REPO / "tools/stale_map.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
