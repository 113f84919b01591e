"""Sweeps over machines, the DVC way (docs/long-runs.md, "Sweeps over machines"): `fashiondiff
sweep-one` runs one experiment in a clone of its own and pushes it. The end-to-end test runs two
at once on this machine against a local bare git remote, a local DVC remote (the project's
`shared`, pointed there with `dvc remote modify`) and one `mlflow server`; a third clone pulls
both, lists them with their scores and applies one. Real git, DVC and MLflow, no mocks.

To stay cheap, the baseline is the end-to-end test's SMALL project, repro'd once, and the two
experiments change what reruns the fewest stages and still proves the point: one changes an
`evaluate` setting (evaluate, register), the other a prior-only training setting (train_prior,
evaluate, register), so that one experiment has a new model to push and to bring back."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_pipeline_e2e import DVC, fresh_copy, sh, stale_stages
from test_tracking import _server

from fashiondiff.commands.sweep import PLACEHOLDER_REMOTE, chosen, dvc_remote, read_sweep
from fashiondiff.errors import PipelineError
from fashiondiff.processes import free_port, project_env, stop_process_group

REPO = Path(__file__).resolve().parents[1]
# name -> (params, the stages they rerun)
EXPERIMENTS = {
    "guidance-3": ({"evaluate.guidance_scale": 3.0}, {"evaluate", "register"}),
    "prior-dropout": ({"prior.text_dropout": 0.2}, {"train_prior", "evaluate", "register"}),
}
SCORES = ("catalogue.fd_clip", "generic.fd_clip", "edit.kept")  # scores.json's that the tiny models move


# -- GPU leases: several runs on one machine, each its own GPUs --------------------------------

HOLD = """
import sys, time
from pathlib import Path
from fashiondiff.gpu_lease import leased
with leased(["0", "1"], 1, Path(sys.argv[1]), poll_s=0.05) as ids:
    start = time.time()
    time.sleep(1.5)
    print(ids[0], start, time.time())
"""


def test_concurrent_runs_lease_distinct_gpus_and_the_extra_one_waits(tmp_path):
    """Three processes at once, two GPUs, one each: no GPU is held by two at a time, and the third
    starts only once one of the first two has given its GPU back."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=project_env()
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60)[0].splitlines() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    held = sorted((float(start), float(end), gpu) for gpu, start, end in (lines[-1].split() for lines in outputs))
    assert sum(lines[0] == "waiting for 1 of GPUs 0,1: other runs hold them" for lines in outputs) == 1, outputs
    first, second, third = held
    assert {first[2], second[2]} == {"0", "1"}
    assert third[0] >= min(first[1], second[1])
    for a, b in ((first, third), (second, third), (first, second)):
        assert a[2] != b[2] or a[1] <= b[0], held  # the same GPU: one after the other


def test_sweep_file_errors_are_one_line_naming_the_key(tmp_path, monkeypatch):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"git_remote": "/r.git", "experiments": [{"name": "a", "parms": {}}]}))
    with pytest.raises(PipelineError, match=r"sweep.yaml: experiments.0.parms: Extra inputs"):
        read_sweep(path)
    path.write_text(yaml.safe_dump({"git_remote": "/r.git", "experiments": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(PipelineError, match="names must differ"):
        read_sweep(path)
    path.write_text(yaml.safe_dump({"git_remote": "/r.git", "experiments": [{"name": "a"}, {"name": "b"}]}))
    sweep = read_sweep(path)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    with pytest.raises(PipelineError, match="SLURM_ARRAY_TASK_ID"):
        chosen(sweep, None, path)
    with pytest.raises(PipelineError, match=r"no experiment 2: it has 2 \(0 to 1\)"):
        chosen(sweep, 2, path)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert chosen(sweep, None, path).name == "b"


def test_a_failed_step_is_one_error_line_and_its_exit_status(tmp_path):
    """A git remote that is not there: `git clone` fails, and sweep-one says so in one line."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "git_remote": str(tmp_path / "nowhere.git"),
                "workdir": str(tmp_path / "w"),
                "experiments": [{"name": "a", "params": {"lr": 0.001}}],
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "fashiondiff", "sweep-one", str(sweep), "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=project_env(),
    )
    assert result.returncode == 128  # git's
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: git clone -q {tmp_path / 'nowhere.git'} {tmp_path / 'w/.a.partial'} in "
        f"{tmp_path / 'w'} exited with 128"
    ], result.stderr
    assert not (tmp_path / "w/a").exists()  # no half-made clone for a rerun to take as finished


def test_the_committed_placeholder_remote_is_refused(tmp_path):
    """The project's `shared` DVC remote as committed is a placeholder: sweep-one says so."""
    sh(tmp_path, "git", "init", "-q")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text((REPO / ".dvc/config").read_text())
    with pytest.raises(PipelineError, match=f"DVC remote shared is still {PLACEHOLDER_REMOTE}"):
        dvc_remote(tmp_path, project_env())


# -- two experiments at once, in two clones; a third clone sees both --------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    """The baseline repro'd once and pushed to a bare git remote and a local DVC remote; an `mlflow
    server`; two `fashiondiff sweep-one` started together, one per experiment, sharing two GPU ids.
    Yields the paths, the server's address and each run's output."""
    root = tmp_path_factory.mktemp("sweep")
    seed = root / "seed"
    seed.mkdir()
    fresh_copy(seed, skip=("reports/",))
    remote, storage = root / "remote.git", root / "dvc-storage"
    sh(seed, str(DVC), "remote", "modify", "shared", "url", str(storage))  # as docs/long-runs.md says
    sh(seed, str(DVC), "repro")
    sh(seed, "git", "add", "-A")
    sh(seed, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline")
    sh(seed, str(DVC), "push")
    sh(root, "git", "init", "-q", "--bare", "-b", "main", str(remote))
    sh(seed, "git", "push", "-q", str(remote), "HEAD:main")

    port = free_port()
    server = _server(root, port)
    try:
        uri = f"http://127.0.0.1:{port}"
        sweep_file = root / "sweep.yaml"
        sweep_file.write_text(
            yaml.safe_dump(
                {
                    "git_remote": str(remote),
                    "workdir": str(root / "clones"),
                    "mlflow": {"tracking_uri": uri},
                    "experiments": [{"name": name, "params": params} for name, (params, _) in EXPERIMENTS.items()],
                }
            )
        )
        started = time.monotonic()
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fashiondiff",
                    "sweep-one",
                    str(sweep_file),
                    str(index),
                    "--gpus",
                    "0,1",
                    "--per-run",
                    "1",
                    "--lock-dir",
                    str(root / "gpu-locks"),
                ],
                cwd=root,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=project_env(FASHIONDIFF_TRACKING="on"),
            )
            for index in range(len(EXPERIMENTS))
        ]
        outputs = {name: run.communicate(timeout=1800)[0] for name, run in zip(EXPERIMENTS, runs, strict=True)}
        print(f"two sweep-one at once: {time.monotonic() - started:.0f} s")
        for run, (name, out) in zip(runs, outputs.items(), strict=True):
            assert run.returncode == 0, f"{name}:\n{out[-5000:]}"
        yield {"root": root, "seed": seed, "remote": remote, "uri": uri, "outputs": outputs}
    finally:
        stop_process_group(server)


@pytest.fixture(scope="module")
def third(sweep) -> Path:
    """A third clone of the git remote with both experiments pulled (`dvc exp pull origin`)."""
    clone = sweep["root"] / "third"
    sh(sweep["root"], "git", "clone", "-q", str(sweep["remote"]), str(clone))
    sh(clone, str(DVC), "exp", "pull", "origin")
    return clone


@pytest.mark.slow
@pytest.mark.e2e
def test_each_experiment_ran_only_what_its_settings_make_stale_on_its_own_gpu(sweep):
    """The baseline came from the DVC remote (nothing before the changed stage ran), and the two
    runs, at once, leased different GPU ids."""
    leased = set()
    for name, (_, stages) in EXPERIMENTS.items():
        out = sweep["outputs"][name]
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert ran == stages, (name, out[-3000:])
        [gpu] = [line.split()[2] for line in out.splitlines() if line.startswith("sweep-one: GPUs ")]
        leased.add(gpu)
    assert leased == {"0", "1"}


@pytest.mark.slow
@pytest.mark.e2e
def test_a_third_clone_lists_both_experiments_with_their_scores(sweep, third):
    rows = list(csv.DictReader(io.StringIO(sh(third, str(DVC), "exp", "show", "--no-pager", "--csv"))))
    by_name = {row["Experiment"]: row for row in rows if row["Experiment"] in EXPERIMENTS}
    assert set(by_name) == set(EXPERIMENTS), [row["Experiment"] for row in rows]
    [baseline] = [row for row in rows if row["rev"] == "main"]
    for name, (params, _) in EXPERIMENTS.items():
        row = by_name[name]
        scores = yaml.safe_load(sh(third, "git", "show", f"{row['rev']}:reports/scores.json"))
        for key in SCORES:
            domain, score = key.split(".")
            assert float(row[key]) == pytest.approx(scores[domain][score], abs=1e-5), (name, key)
        assert row["catalogue.fd_clip"] != baseline["catalogue.fd_clip"]  # evaluated anew, on its settings
        for key, value in params.items():
            assert float(row[key]) == value, (name, key, row[key])
        assert experiment_revs(third)[name].startswith(row["rev"])


@pytest.mark.slow
@pytest.mark.e2e
def test_the_tracking_server_holds_both_runs_with_their_scores(sweep, third):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=sweep["uri"])
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    for name, (params, stages) in EXPERIMENTS.items():
        [parent] = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`dvc.exp_name` = '{name}' and tags.`fashiondiff.role` = 'pipeline'",
        )
        assert parent.info.status == "FINISHED"
        assert all(float(parent.data.params[k]) == v for k, v in params.items())
        scores = yaml.safe_load(sh(third, "git", "show", f"{experiment_revs(third)[name]}:reports/scores.json"))
        assert parent.data.metrics["evaluate.catalogue.fd_clip"] == pytest.approx(
            scores["catalogue"]["fd_clip"], rel=1e-6
        )
        children = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert {c.info.run_name for c in children} == stages


@pytest.mark.slow
@pytest.mark.e2e
def test_applying_an_experiment_in_the_third_clone_brings_its_models_back(sweep, third):
    """`dvc exp apply` of the experiment that trained: its models/prior (pulled from the DVC
    remote), not the baseline's, every output as its dvc.lock says (only `register` stale)."""
    baseline = yaml.safe_load((third / "dvc.lock").read_text())["stages"]
    sh(third, str(DVC), "exp", "apply", "prior-dropout")
    applied = yaml.safe_load((third / "dvc.lock").read_text())["stages"]
    assert applied["train_prior"]["outs"][0]["md5"] != baseline["train_prior"]["outs"][0]["md5"]
    assert applied["train_decoder"]["outs"] == baseline["train_decoder"]["outs"]
    assert (third / "models/prior/model_index.json").is_file()
    assert stale_stages(third) == {"register"}


def experiment_revs(clone: Path) -> dict[str, str]:
    """Each experiment's commit, by name, from DVC's refs (refs/exps/<baseline, as 2 + 38 digits>/<name>;
    DVC keeps refs/exps/EXEC_APPLY and the like beside them)."""
    refs = sh(clone, "git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)")
    return {ref.split("/")[-1]: rev for ref, rev in (line.split() for line in refs.splitlines()) if ref.count("/") == 4}
