"""fashiondiff.tracking against real MLflow (sqlite, and a real ``mlflow server``); no mocks.

Stages run as separate Python processes, as under ``dvc repro``.
Run: PYTHONPATH=src python -m pytest tests/test_tracking.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, replaced, repo_params

from fashiondiff import tracking
from fashiondiff.commands import ui
from fashiondiff.errors import PipelineError
from fashiondiff.processes import (
    free_port,
    project_env,
    running,
    start_group,
    stop_process_group,
    wait_until_up,
)
from fashiondiff.tracking import pipeline_identity, resolve_tracking_uri, stage_run

# mlflow's own SQLAlchemy models trigger this; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

EXPERIMENT = repo_params().mlflow.experiment

# One "stage": a few step metrics, stage params, a summary and a small artefact.
STAGE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from fashiondiff.config.whole import load_params
    from fashiondiff.tracking import stage_run

    stage, uri, lr, params_file = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    params = load_params(params_file).model_copy(update={"lr": lr})
    note = Path(f"{stage}.txt")
    note.write_text(stage)
    with stage_run(stage, params, tracking_uri=uri) as tracker:
        tracker.log_params({"stage_extra": stage})
        for step in (0, 10, 20):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_summary({"loss": 0.25, "steps": 20})
        tracker.log_artifact(note, "notes")
""")


def _run_stages(workdir: Path, uri: str, stages=("prepare", "train"), lr: float = 0.0005) -> None:
    script = workdir / "stage.py"
    script.write_text(STAGE)
    for stage in stages:
        out = subprocess.run(
            [sys.executable, str(script), stage, uri, str(lr), str(REPO / "params.yaml")],
            cwd=workdir,
            env=project_env(FASHIONDIFF_TRACKING="on"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == ""  # nothing from mlflow on stdout
        assert out.stderr.count("mlflow:") == 1, out.stderr  # one line, on stderr


@pytest.fixture
def local_stage(tmp_path, monkeypatch):
    """In-process stages in a fresh cwd, outside any git repo or DVC run."""
    for key in list(os.environ):
        if key.startswith("DVC_"):
            monkeypatch.delenv(key)
    monkeypatch.delenv(tracking.ENV_SWITCH, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _client(db: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    return client, client.get_experiment_by_name(EXPERIMENT).experiment_id


def _search(client, exp_id: str, flt: str, deleted: bool = False):
    from mlflow.entities import ViewType

    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([exp_id], filter_string=flt, run_view_type=view)


PARENTS = "tags.`fashiondiff.role` = 'pipeline'"


def _children(parent_id: str) -> str:
    return f"tags.`mlflow.parentRunId` = '{parent_id}'"


# -- sqlite --------------------------------------------------------------------------------


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_two_stage_processes_share_one_parent(local_stage):
    tmp_path = local_stage
    _run_stages(tmp_path, "sqlite:///mlflow.db")  # relative: resolved against the stage's cwd
    client, exp_id = _client(tmp_path / "mlflow.db")

    [parent] = _search(client, exp_id, PARENTS)
    flat = repo_params().flat()
    assert parent.data.params == {k: str(v) for k, v in flat.items()}  # > 60 params, all of them
    assert parent.data.params["lr"] == "0.0005" and parent.data.params["data.caption"] == "{name}"
    assert parent.data.tags["dvc.exp_name"] == "local"
    assert parent.data.tags["mlflow.source.git.commit"] == "unknown"  # tmp_path is no git repo
    assert parent.data.metrics == {"prepare.loss": 0.25, "prepare.steps": 20, "train.loss": 0.25, "train.steps": 20}
    assert parent.info.status == "FINISHED"

    children = _search(client, exp_id, _children(parent.info.run_id))
    assert sorted(c.info.run_name for c in children) == ["prepare", "train"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(0, 1.0), (10, 1 / 11), (20, 1 / 21), (20, 0.25)]
        assert child.data.metrics["loss"] == 0.25  # the summary is the latest value
        assert child.data.params == {"stage_extra": child.info.run_name}
        assert child.info.status == "FINISHED"
        art = tmp_path / "mlartifacts" / child.info.run_id / "artifacts" / "notes"
        assert (art / f"{child.info.run_name}.txt").read_text() == child.info.run_name

    with stage_run("train", replaced(repo_params(), lr=0.001)):  # in-process: same cwd
        pass
    parents = _search(client, exp_id, PARENTS)
    assert sorted(p.data.params["lr"] for p in parents) == ["0.0005", "0.001"]


def test_rerun_supersedes_old_child_and_failure_is_recorded(local_stage):
    params = repo_params()
    for _ in range(2):  # dvc repro --force: the same stage again under the same key
        with stage_run("train", params) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=0)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("evaluate", params) as tracker:
            raise RuntimeError("boom")

    client, exp_id = _client(local_stage / "mlflow.db")
    [parent] = _search(client, exp_id, PARENTS)
    assert parent.info.run_id == tracker.parent_run_id
    assert parent.info.status == "FAILED"  # follows the last stage
    live = {c.info.run_name: c for c in _search(client, exp_id, _children(parent.info.run_id))}
    assert sorted(live) == ["evaluate", "train"]
    assert live["evaluate"].info.status == "FAILED"
    every = _search(client, exp_id, _children(parent.info.run_id), deleted=True)
    [old] = [c for c in every if c.info.lifecycle_stage == "deleted"]
    assert old.data.tags["fashiondiff.superseded_by"] == live["train"].info.run_id


def test_runs_view_shows_changed_params_and_headline_metrics(local_stage):
    """The experiment opens as a training experiment, and the saved "pipeline runs" view has
    lr, the params that differ between pipeline runs, and the given metrics as columns."""
    from PIL import Image

    params = repo_params()
    with pytest.raises(PipelineError, match="has no pipeline run yet: run `make repro` first"):
        ui.publish_runs_view(params, ["train.loss"], ["lr"])
    for changed in (params, replaced(params, lr=0.001, seed=7)):
        with stage_run("train", changed) as tracker:
            tracker.log_summary({"loss": 0.25})
            tracker.log_image(Image.new("RGB", (4, 4)), "samples/grid.png", parent_name="grid.png")
    address = ui.publish_runs_view(params, ["train.loss"], ["lr"])
    client, exp_id = _client(local_stage / "mlflow.db")
    assert address == (f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey={ui.RUNS_VIEW_ID}")
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{ui.RUNS_VIEW_ID}"])
    assert view["name"] == ui.RUNS_VIEW_NAME and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["selectedColumns"] == ["params.`lr`", "params.`seed`", "metrics.`train.loss`"]
    assert state["columnOrder"][-3:] == state["selectedColumns"]
    assert set(state["columnWidths"]) == set(state["selectedColumns"])
    for parent in _search(client, exp_id, PARENTS):  # at the root: MLflow's compare page shows it
        assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["grid.png"]


def _stage_reports(folder: Path):
    """Reports as the stages write them: the trainings' summaries, evaluate's two files (with
    lists, texts and booleans, which no summary logs)."""
    from fashiondiff.parent_scores import StageReports

    reports = {
        "train_prior": {"loss_first_epoch": 0.5, "loss_last_epoch": 0.125, "steps": 6, "val_clip_score": 42.5},
        "train_decoder": {"loss_first_epoch": 0.75, "loss_last_epoch": 0.25, "steps": 6},
        "metrics": {
            d: {"base": {"clip_score": 40.0 + i, "fd_clip": 90.5}, "tuned": {"clip_score": 50.0 + i, "fd_clip": 12.25}}
            for i, d in enumerate(("catalogue", "generic"))
        },
        "evaluation": {
            "catalogue": {
                "real": {"r_precision": 0.75},
                "prompts": 3,
                "truncated_captions": 0,
                "prompts_with_replacement": False,
                "edits": {"strengths": [0.3, 0.5]},
            },
            "fid_status": "skipped",
            "extra_count": 4,
        },
    }
    for name, report in reports.items():
        (folder / f"{name}.json").write_text(json.dumps(report))
    return reports, StageReports(*(folder / f"{name}.json" for name in reports))


def test_register_gives_a_cached_repro_s_parent_the_stages_scores(local_stage):
    """A cached `dvc repro` (new commit or params, outputs up to date) runs register alone, under a
    new parent: it logs each stage's summary from the stage's reports, named and valued as the
    stage logs it. Under a parent where a stage ran, that stage's values are left alone."""
    from fashiondiff.evaluate.summary import summary_metrics as evaluate_summary
    from fashiondiff.parent_scores import log_parent_scores
    from fashiondiff.training_summary import summary_metrics as training_summary

    reports, files = _stage_reports(local_stage)
    params = repo_params()
    with stage_run("train_prior", params) as tracker:  # the stages' own logging, train_decoder not run
        tracker.log_summary(training_summary(reports["train_prior"]))
    with stage_run("evaluate", params) as tracker:
        tracker.log_summary(evaluate_summary(reports["metrics"], reports["evaluation"]))
    with stage_run("register", params) as tracker:
        logged = log_parent_scores(tracker, files)
    assert logged == {
        "train_prior": [],
        "evaluate": [],
        "train_decoder": ["train_decoder.loss_first_epoch", "train_decoder.loss_last_epoch", "train_decoder.steps"],
    }
    with stage_run("register", replaced(params, seed=7)) as cached:  # a new parent: register alone
        log_parent_scores(cached, files)

    client, _ = _client(local_stage / "mlflow.db")
    ran, filled = (client.get_run(t.parent_run_id).data.metrics for t in (tracker, cached))
    assert tracker.parent_run_id != cached.parent_run_id
    assert filled == ran  # the same columns, the same values
    assert {k: v for k, v in filled.items() if k.startswith("evaluate.")} == {
        "evaluate.catalogue.clip_score": 50.0,
        "evaluate.catalogue.fd_clip": 12.25,
        "evaluate.generic.clip_score": 51.0,
        "evaluate.generic.fd_clip": 12.25,
        "evaluate.reference.catalogue.base.clip_score": 40.0,
        "evaluate.reference.catalogue.base.fd_clip": 90.5,
        "evaluate.reference.generic.base.clip_score": 41.0,
        "evaluate.reference.generic.base.fd_clip": 90.5,
        "evaluate.reference.catalogue.real.r_precision": 0.75,
        "evaluate.reference.catalogue.prompts": 3,
        "evaluate.reference.catalogue.truncated_captions": 0,
        "evaluate.reference.extra_count": 4,
    }
    assert filled["train_prior.val_clip_score"] == 42.5 and filled["train_decoder.steps"] == 6
    for key in ("evaluate.catalogue.clip_score", "train_prior.loss_last_epoch"):  # logged once: left alone
        assert len(client.get_metric_history(tracker.parent_run_id, key)) == 1, key


def test_many_and_long_params_are_batched(local_stage):
    extras = {f"extra.{i:03d}": i for i in range(250)} | {"long": "x" * 10_000}
    with stage_run("embed", repo_params()) as tracker:
        tracker.log_params(extras)
        tracker.log_metrics({f"m{i}": float(i) for i in range(1001)}, step=3)
    client, _ = _client(local_stage / "mlflow.db")
    run = client.get_run(tracker.run_id)
    assert len(run.data.params) == 251 and run.data.params["extra.249"] == "249"
    assert len(run.data.params["long"]) == 6000
    assert len(run.data.metrics) == 1001


def test_pipeline_key(local_stage, monkeypatch):
    base = pipeline_identity(repo_params())
    assert base == pipeline_identity(repo_params())  # no time, no randomness
    assert pipeline_identity(replaced(repo_params(), lr=0.001))["key"] != base["key"]
    monkeypatch.setenv("DVC_STAGE", "train_prior")
    repro = pipeline_identity(repo_params())
    assert repro["exp_name"] == "repro" and repro["key"] != base["key"]
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    exp = pipeline_identity(repo_params())
    assert (exp["exp_name"], exp["commit"]) == ("sunny-lark", "a" * 40)
    assert exp["key"] != repro["key"]


def test_resolve_tracking_uri(tmp_path):
    assert resolve_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_tracking_uri("http://host:5000", tmp_path) == "http://host:5000"


def test_off_switch_is_a_no_op(local_stage, monkeypatch):
    monkeypatch.setenv(tracking.ENV_SWITCH, "off")
    with stage_run("train", repo_params()) as tracker:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.log_summary({"loss": 1.0})
        tracker.log_artifact("missing.txt")
    assert tracker.run_id == "" and list(local_stage.iterdir()) == []


def test_bad_stage_name_fails_early():
    with pytest.raises(PipelineError, match="stage name"):
        with stage_run("train'; drop", repo_params()):
            pass


# -- a real tracking server ----------------------------------------------------------------


def _get(base: str, endpoint: str, **query) -> dict:
    url = f"{base}{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def _post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@pytest.mark.slow
def test_stages_against_a_real_tracking_server(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    work.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    with running(
        cmd,
        f"{base}/health",
        log=tmp_path / "server.log",
        cwd=tmp_path,
        env=project_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    ):
        _run_stages(work, base)

        exp = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)
        exp_id = exp["experiment"]["experiment_id"]
        found = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "filter": PARENTS})
        [parent] = found["runs"]
        parent_id = parent["info"]["run_id"]
        params = {p["key"]: p["value"] for p in parent["data"]["params"]}
        assert len(params) == len(repo_params().flat())
        assert params["lr"] == "0.0005" and params["data.caption"] == "{name}"
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        assert metrics["prepare.loss"] == 0.25 and metrics["train.steps"] == 20

        found = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id], "filter": _children(parent_id)})
        children = {r["info"]["run_name"]: r["info"]["run_id"] for r in found["runs"]}
        assert sorted(children) == ["prepare", "train"]
        for name, run_id in children.items():
            history = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key="loss")
            assert [int(m.get("step", 0)) for m in history["metrics"]] == [0, 10, 20, 20]
            files = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="notes")
            assert [f["path"] for f in files["files"]] == [f"notes/{name}.txt"]
        assert len(list((tmp_path / "server-artifacts").rglob("*.txt"))) == 2  # proxied to the server
        assert not (work / "mlartifacts").exists()


# -- a tracking server that is not there, or goes away ---------------------------------------


def _server(tmp_path: Path, port: int):
    """``mlflow server`` on ``port`` with its store in ``tmp_path`` (the same store when started
    again), once it answers; stop it with stop_process_group."""
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination",
        str(tmp_path / "server-artifacts"),
    ]
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    proc = start_group(cmd, log, cwd=tmp_path, env=project_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
    wait_until_up(f"http://127.0.0.1:{port}/health", proc, 120, log)
    return proc


def _history(base: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    found = _get(base, "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((int(m.get("step", 0)), m["value"], int(m["timestamp"])) for m in found)


@pytest.mark.slow
def test_an_unreachable_server_stops_a_stage_before_its_work_with_one_line(tmp_path):
    """The training stage, pointed at a port nothing listens on and at a cache that does not
    exist: the error is the tracking server's (so nothing was loaded before), within the bound."""
    port = free_port()
    params = repo_params().model_dump()
    params["mlflow"]["tracking_uri"] = f"http://127.0.0.1:{port}"
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    started = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages/train_prior.py"),
            "--cache",
            "missing",
            "--out",
            "m",
            "--checkpoints",
            "c",
            "--summary",
            "s.json",
            "--plot",
            "p.csv",
        ],
        cwd=tmp_path,
        env=project_env(FASHIONDIFF_TRACKING="on", FASHIONDIFF_TRACKING_START_S="3", FASHIONDIFF_TRACKING_RETRY_S="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: mlflow (http://127.0.0.1:{port}): ") and "tried for 3 s" in last, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "c").exists()
    assert time.monotonic() - started < 120  # imports included, on a busy 2-core machine


@pytest.mark.slow
def test_a_server_away_past_the_stage_end_gets_its_calls_from_the_next_stage(tmp_path, monkeypatch, capsys):
    """Calls made while the server is down return at once; the stage's end waits
    FASHIONDIFF_TRACKING_FLUSH_S, then keeps them on disk under the project root; the next stage
    that reaches the server delivers them (metrics, the artifact, the runs' end)."""
    for key in [k for k in os.environ if k.startswith("DVC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv(tracking.ENV_SWITCH, raising=False)
    for key, value in {
        "FASHIONDIFF_TRACKING_FLUSH_S": "1",
        "FASHIONDIFF_TRACKING_RETRY_S": "0.5",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }.items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = _server(tmp_path, port)
    note = work / "note.txt"
    note.write_text("kept")
    try:
        with stage_run("train", repo_params(), tracking_uri=base) as tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            assert tracker.flush(60)
            stop_process_group(server)
            down = time.monotonic()
            for step in (2, 3):
                tracker.log_metrics({"loss": 1.0 / step}, step=step)
            tracker.log_summary({"loss": 0.25})
            tracker.log_artifact(note, "notes")
            assert time.monotonic() - down < 1  # nothing waits on the server
        assert time.monotonic() - down < 30  # the end: FLUSH_S, plus a request in flight at most
        [spool] = list((work / ".fashiondiff/outbox").glob("*/*/ops.jsonl"))
        note.unlink()  # the spool has its own copy
        err = capsys.readouterr().err
        assert "does not answer" in err and f"kept in {spool.parent}" in err, err

        server = _server(tmp_path, port)
        with stage_run("evaluate", repo_params(), tracking_uri=base):
            pass
        assert "delivering 7 tracking calls an earlier stage kept" in capsys.readouterr().err
        assert not spool.parent.exists()
        exp_id = _get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"][
            "experiment_id"
        ]
        runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp_id]})["runs"]
        train = next(r for r in runs if r["info"]["run_name"] == "train")
        assert [(s, v) for s, v, _ in _history(base, tracker.run_id, "loss")] == [
            (1, 1.0),
            (2, 0.5),
            (3, 0.25),
            (3, 1 / 3),
        ]
        assert train["info"]["status"] == "FINISHED"
        files = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=tracker.run_id, path="notes")["files"]
        assert [f["path"] for f in files] == ["notes/note.txt"]
        parent = _get(base, "/api/2.0/mlflow/runs/get", run_id=tracker.parent_run_id)["run"]
        assert {m["key"]: m["value"] for m in parent["data"]["metrics"]} == {"train.loss": 0.25}
    finally:
        stop_process_group(server)


OUTAGE_EPOCHS = 500  # 2,000 steps of the tiny prior: ~40 s on an idle core, minutes on a busy one


@pytest.mark.slow
def test_a_training_stage_outlives_a_server_stopped_for_a_minute(tmp_path, tiny_base, train_cache):
    """The issue's check: a real `mlflow server` stopped 60 s while `train_prior` trains, then
    started again on the same store. The stage keeps training through it (loss points stamped
    while the server was down), finishes with exit 0, and MLflow ends up with every logged loss
    point (the loss curve DVC plots, point for point), the summary and the files. The stage's
    end may wait for the server here (FLUSH_S 600: the training may be over before the minute is)."""
    from pipeline_fixtures import stage_params

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    params = stage_params(
        tiny_base,
        epochs=OUTAGE_EPOCHS,
        **{"train.log_every": 5, "train.checkpoint_every": 100, "mlflow.tracking_uri": base},
    )
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    server = _server(tmp_path, port)
    args = [
        "--cache",
        train_cache,
        "--out",
        "models/prior",
        "--checkpoints",
        "ckpt",
        "--summary",
        "prior.json",
        "--plot",
        "prior.csv",
    ]
    log = tmp_path / "stage.log"
    stage = start_group(
        [sys.executable, str(REPO / "stages/train_prior.py"), *map(str, args)],
        log,
        cwd=tmp_path,
        env=project_env(
            FASHIONDIFF_TRACKING="on", FASHIONDIFF_TRACKING_RETRY_S="2", FASHIONDIFF_TRACKING_FLUSH_S="600"
        ),
    )
    try:
        run_id = _wait_for_first_loss(base, stage, log)
        stop_process_group(server)
        down = time.time()
        time.sleep(60)
        assert stage.poll() is None, log.read_text()[-2000:]  # training, or waiting to deliver
        server = _server(tmp_path, port)
        up = time.time()
        assert stage.wait(timeout=900) == 0, log.read_text()[-3000:]
        text = log.read_text()
        assert "does not answer" in text and "answers again after" in text, text[-3000:]
        history = _history(base, run_id, "loss")
        run = _get(base, "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
        files = {f["path"] for f in _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id)["files"]}
    finally:
        stop_process_group(stage)
        stop_process_group(server)
    curve = [line.split(",") for line in (tmp_path / "prior.csv").read_text().splitlines()[1:]]
    assert [(s, v) for s, v, _ in history] == [(int(s), float(v)) for s, _, v, _ in curve]  # every point
    assert any(down < ts / 1000 < up for _, _, ts in history), "no loss point was logged while the server was down"
    assert run["info"]["status"] == "FINISHED"
    assert {m["key"] for m in run["data"]["metrics"]} >= {"loss", "lr", "loss_last_epoch", "samples_per_s_mean"}
    assert {"prior.json", "prior.csv", "fashiondiff_config.json"} <= files


def _wait_for_first_loss(base: str, stage, log: Path, limit: float = 300) -> str:
    """The stage's run id, once MLflow holds a loss point of it."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if stage.poll() is not None:
            pytest.fail(f"the stage exited early:\n{log.read_text()[-3000:]}")
        found = [line for line in log.read_text().splitlines() if line.startswith("mlflow: train_prior run ")]
        if found:
            run_id = found[0].split()[3]
            if _history(base, run_id, "loss"):
                return run_id
        time.sleep(1)
    pytest.fail(f"no loss point in MLflow in {limit} s:\n{log.read_text()[-3000:]}")
