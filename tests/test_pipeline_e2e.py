"""End to end: `dvc repro` on a fresh copy of the repository with shrunken sizes; every
stage's reads and imports against dvc.yaml; the runnable blocks of README.md and then of
docs/*.md run as written (two `dvc exp run -S lr=...`, which rerun only training, evaluation
and register; `dvc exp show`, which leads with the scores and lr in 200 columns; `fashiondiff
generate`; docs/reproducibility.md's `dvc repro --force`, bit for bit); the MLflow store, and
its UI in headless Chromium showing both experiments with lr and the headline metrics; and a
run on "real" inputs (files no stage writes) runs no stand-in stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import merge

from fashiondiff.processes import free_port, printed_word, project_env, running

pytestmark = pytest.mark.e2e  # `dvc repro` on a copy of the project: minutes

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")
RUNNABLE = "<!-- runnable -->"  # README.md, docs/*.md: the next ```bash block runs as written (below)
# docs/ pages whose runnable blocks run after the README's, in this order (any other page after
# them, by name), except those a test of their own runs (DOCS_OWN_TEST).
DOCS_ORDER = ("docs/generating.md", "docs/experiments.md")
DOCS_OWN_TEST = (
    "docs/reproducibility.md",  # test_repro_force_is_bit_for_bit_reproducible
    "docs/long-runs.md",  # test_two_experiments_through_dvc_queue_land_in_the_project_store
    "docs/paper-run.md",
)  # tests/test_paper_run.py, on a project of its own
TERMINAL = 200  # columns of the terminal `dvc exp show` must fit its headline into

SMALL = {  # every size shrunk; the method's hyperparameters except epochs/steps kept
    "epochs": 2,
    "diffusion_steps": 4,
    "standin": {
        "synthetic": {
            "train_products": 6,
            "validation_products": 3,
            "poses_per_product": 2,
            "generic_train_items": 4,
            "generic_validation_items": 3,
        },
        "pretrain": {
            "clip_steps": 4,
            "movq_steps": 4,
            "mclip_steps": 4,
            "batch_size": 8,
            "generator": {"prior_epochs": 2, "unet_epochs": 2, "batch_size": 4, "checkpoint_every": 2},
        },
    },
    "evaluate": {"num_prompts": 3, "prior_steps": 3, "batch_size": 3, "r_precision_candidates": 3, "edit_items": 2},
    "train": {"checkpoint_every": 4, "log_every": 1, "warmup_steps": 0},
}


def sh(cwd: Path, *cmd: str, **extra_env: str) -> str:
    """Run ``cmd`` in the project copy ``cwd`` (its own src/, tracking on); its output."""
    env = project_env(src=cwd / "src", **{"FASHIONDIFF_TRACKING": "on", **extra_env})
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def fresh_copy(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """A fresh clone-like copy of the repository in ``root``: the files git tracks or would
    track (but those under ``skip``), SMALL params, one commit."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith(skip):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = merge(yaml.safe_load((root / "params.yaml").read_text()), SMALL)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "git", "init", "-q")
    sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    sh(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "fresh clone")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A fresh clone-like copy (without reports/), small params, one commit, `dvc repro` done."""
    root = fresh_copy(tmp_path_factory.mktemp("project"), skip=("reports/",))
    sh(root, str(DVC), "repro", FASHIONDIFF_AUDIT=str(root / "audit"))
    return root


def dvc_stages(root: Path) -> dict[str, dict]:
    """Every stage of dvc.yaml and standin/dvc.yaml by name (foreach stages once)."""
    stages = {}
    for name in ("dvc.yaml", "standin/dvc.yaml"):
        for stage, body in yaml.safe_load((root / name).read_text())["stages"].items():
            stages[stage] = body.get("do", body)
    return stages


def lock_md5s(root: Path) -> dict[str, str]:
    """path -> md5 of every output in dvc.lock and standin/dvc.lock."""
    found = {}
    for name in ("dvc.lock", "standin/dvc.lock"):
        for stage in yaml.safe_load((root / name).read_text())["stages"].values():
            for out in stage.get("outs", []):
                found[out["path"]] = out["md5"]
    return found


def test_every_stage_reads_and_imports_exactly_what_dvc_yaml_declares(project):
    """The audit each stage process wrote at exit (FASHIONDIFF_AUDIT) against its declaration:
    an undeclared read fails the stage itself; here, declared-but-unread params and any
    difference between imported project modules and declared code deps fail."""
    stages = dvc_stages(project)
    seen = set()
    for record_file in sorted((project / "audit").glob("*.json")):
        record = json.loads(record_file.read_text())
        stage = stages[record["stage"]]
        seen.add(record["stage"])
        declared_code = {d for d in stage["deps"] if d.startswith("src/")}
        imported = {f"src/{m}" for m in record["modules"]}
        assert imported == declared_code, (record["stage"], sorted(imported ^ declared_code))
        declared = [p for p in stage.get("params", []) if isinstance(p, str)]
        unread = [k for k in declared if not any(r == k or r.startswith(f"{k}.") for r in record["params_read"])]
        assert not unread, (record["stage"], unread)
        assert f"stages/{record['stage'].split('@')[0]}.py" in stage["deps"]
    assert seen == set(stages), sorted(set(stages) - seen)


def test_params_comments_name_the_stages_that_declare_each_key(project):
    """params.yaml's "read by" comments: a key whose comment starts with stage names (``key:
    value  # extract, embed: ...``) names every stage that declares it, a key under it or a
    section above it, and no other; every top-level key has such a comment."""
    stages = dvc_stages(project)
    names = "|".join(sorted(stages, key=len, reverse=True))
    listing = re.compile(rf"^\(?((?:{names})(?:, (?:{names}))*)\b")
    path: list[tuple[int, str]] = []
    checked = []
    for line in (REPO / "params.yaml").read_text().splitlines():  # the project's copy has no comments
        match = re.match(r"^( *)([A-Za-z_][\w]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        path = [(i, k) for i, k in path if i < indent] + [(indent, key)]
        dotted = ".".join(k for _, k in path)
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        listed = listing.match(comment)
        if indent == 0:
            assert comment, f"params.yaml: top-level key {key} has no comment naming its stages"
        if not listed:
            continue
        named = set(listed.group(1).split(", "))
        declaring = {
            s
            for s, body in stages.items()
            if any(
                isinstance(p, str) and (p == dotted or p.startswith(f"{dotted}.") or dotted.startswith(f"{p}."))
                for p in body.get("params", [])
            )
        }
        assert named == declaring, (dotted, sorted(named), sorted(declaring))
        checked.append(dotted)
    assert {"lr", "data", "data.chunk_size", "standin.pretrain", "serve"} <= set(checked), checked


def test_repro_leaves_every_declared_output(project):
    for path in (
        "data/synthetic/fashiongen_train.h5",
        "data/extracted/train/captions.parquet",
        "data/cache/validation/meta.json",
        "models/base/prior/model_index.json",
        "models/prior/model_index.json",
        "models/decoder/model_index.json",
        "reports/samples/grid.png",
        "reports/samples/image_text.png",
        "data/synthetic/generic_train.h5",
        "data/extracted/generic/captions.parquet",
        "reports/samples/generic/tuned/0002.png",
        "reports/samples/edits/catalogue/s50/tuned/0001.png",
        "reports/plots/edits_catalogue_tuned.csv",
        "reports/plots/edits_generic_base.csv",
        "reports/plots/train_prior.csv",
        "reports/plots/train_decoder.csv",
        "reports/plots/validation_prior.csv",
        "reports/validation/decoder/grid.png",
    ):
        assert (project / path).exists(), path
    for model in ("pretrain/*/unet", "prior/*/step-*", "decoder/*/step-*"):  # <fingerprint>/: not outputs
        assert list((project / "checkpoints").glob(model)), model
    metrics = json.loads((project / "reports/metrics.json").read_text())  # base and tuned
    scores = json.loads((project / "reports/scores.json").read_text())  # the DVC metrics: the tuned model
    details = json.loads((project / "reports/evaluation.json").read_text())  # real images' scores, counts
    edit = {f"{kind}_{score}_s{s}" for kind in ("edit",) for score in ("fidelity", "clip_score") for s in (30, 50, 70)}
    for domain in ("catalogue", "generic"):
        assert scores[domain] == {k: metrics[domain]["tuned"][k] for k in ("clip_score", "fd_clip", "r_precision")}
        for model in ("base", "tuned"):
            assert (
                set(metrics[domain][model])
                == {"clip_score", "fd_clip", "r_precision", "mix_fidelity", "mix_clip_score"} | edit
            )
    assert scores["edit"] == {
        "kept": metrics["catalogue"]["tuned"]["edit_fidelity_s50"],
        "clip": metrics["catalogue"]["tuned"]["edit_clip_score_s50"],
    }
    assert details["fid_status"].startswith("skipped") and details["generic"]["r_precision_chance"] == 0.333333
    shown = sh(project, str(DVC), "metrics", "show")  # the evaluation only: train summaries are plain outputs
    assert "generic.r_precision" in shown and "loss_last_epoch" not in shown and "base" not in shown


def stale_stages(root: Path) -> set[str]:
    """The stages `dvc status` lists (``register``, ``standin/dvc.yaml:synthesize``)."""
    status = sh(root, str(DVC), "status")
    return {line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith(("\t", " "))}


# Modules that no stage computes with, one of each kind (docs/stale-map.md): an edit to one
# must stale no stage. `register` is listed by every `dvc status` (always_changed).
NO_STAGE_READS = (
    "src/fashiondiff/commands/generate.py",  # `fashiondiff generate`'s command line
    "src/fashiondiff/serving/page.py",  # the web page
    "src/fashiondiff/commands/ui.py",  # the MLflow UI's saved view
    "tests/conftest.py",
)  # a test helper


def test_an_edit_stales_only_the_stages_that_import_the_module(project):
    """The stale map (docs/stale-map.md) as DVC itself sees it on the repro'd project: a comment
    appended to a command, the page, the UI view or a test helper leaves every stage up to date
    but `register`; the same edit to the sampling library (the control) stales what samples.
    Each file is restored before the next edit."""
    assert stale_stages(project) == {"register"}
    stale = {}
    for edited in (*NO_STAGE_READS, "src/fashiondiff/sampling.py"):
        path = project / edited
        before = path.read_bytes()
        try:
            path.write_bytes(before + b"\n# an edit no stage computes with\n")
            stale[edited] = stale_stages(project)
        finally:
            path.write_bytes(before)
    assert stale == {
        **{f: {"register"} for f in NO_STAGE_READS},
        "src/fashiondiff/sampling.py": {"evaluate", "register"},
    }


def runnable_blocks(page: str, heading: str | None = None) -> list[list[str]]:
    """The commands of ``page``'s ```bash blocks marked RUNNABLE (under ``## heading`` if
    given), one per command (continuation lines joined, comments and blank lines dropped)."""
    text = (REPO / page).read_text()
    if heading is not None:
        text = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"{re.escape(RUNNABLE)}\n```bash\n(.*?)\n```", text, flags=re.S)
    found = []
    for block in blocks:
        commands, current = [], ""
        for line in block.splitlines():
            current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                command = re.sub(r"\s+#[^\"']*$", "", current).strip()  # a trailing comment
                if command and not command.startswith("#"):
                    commands.append(command)
                current = ""
        found.append(commands)
    return found


def docs_with_runnable_blocks() -> list[str]:
    """docs/*.md pages with a RUNNABLE block that no test of its own runs, in DOCS_ORDER."""
    pages = sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md") if runnable_blocks(f"docs/{p.name}"))
    rank = {page: i for i, page in enumerate(DOCS_ORDER)}
    return sorted((p for p in pages if p not in DOCS_OWN_TEST), key=lambda p: (rank.get(p, len(rank)), p))


def run_as_written(cwd: Path, commands: list[str]) -> dict[str, str]:
    """Run ``commands`` in one bash, as a user types them (``source .venv/bin/activate`` first,
    a `.venv` here is the test's venv); output per command."""
    from doc_blocks import run_block  # it imports this module's sh

    venv = cwd / ".venv"
    if not venv.exists():
        venv.symlink_to(Path(sys.executable).parent.parent)
    return run_block(cwd, commands)


@pytest.fixture(scope="module")
def experiments(project) -> dict[str, str]:
    """README "Experiments", its runnable block as written: two `dvc exp run -S lr=...`, then
    exp show, metrics diff, plots diff. Output per command."""
    [commands] = runnable_blocks("README.md", "Experiments")
    assert sum(c.startswith("dvc exp run -S lr=") for c in commands) == 2, commands
    return run_as_written(project, commands)


def test_readme_experiments_rerun_only_training_evaluation_and_register(experiments, project):
    runs = [out for command, out in experiments.items() if command.startswith("dvc exp run")]
    for out in runs:
        ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
        assert ran == {"train_prior", "train_decoder", "evaluate", "register"}, out
    assert (project / "dvc_plots/index.html").is_file()
    assert "dvc_plots" in sh(project, "git", "check-ignore", "dvc_plots")
    table = sh(project, str(DVC), "exp", "show", "--no-pager", "--csv")
    assert "0.001" in table and "0.00025" in table and "0.0005" in table


def test_exp_show_leads_with_the_scores_and_lr(experiments):
    """The first TERMINAL columns of `dvc exp show` (as `less -S` shows them in a terminal that
    wide; without a terminal DVC prints the same table) hold the six scores of the tuned model
    and lr, for the baseline and both experiments."""
    [shown] = [out for command, out in experiments.items() if command == "dvc exp show"]
    lines = [line[:TERMINAL] for line in shown.splitlines() if line.strip()]
    header = next(line for line in lines if "Experiment" in line)
    columns = header.split()
    for name in (
        "catalogue.clip_score",
        "catalogue.fd_clip",
        "catalogue.r_precision",
        "generic.clip_score",
        "generic.fd_clip",
        "generic.r_precision",
        "lr",
    ):
        assert name in columns, header
    assert columns.index("lr") > columns.index("generic.r_precision")  # metrics, then params
    lr_at = header.index(" lr ") + 1
    values = {line[lr_at:].split()[0] for line in lines if re.search(r"\[[\w-]+\]", line)}  # experiment rows
    assert values == {"0.001", "0.00025"}, lines


def test_one_mlflow_parent_per_pipeline_run_with_nested_stages(project, experiments):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fashiondiff.role") == "pipeline"]
    assert len(parents) >= 1
    first = min(parents, key=lambda r: r.info.start_time)
    assert first.data.params["lr"] == "0.0005" and first.data.params["data.caption"] == "{name}"
    children = {
        r.data.tags.get("fashiondiff.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id
    }
    assert {"train_prior", "train_decoder", "evaluate", "register"} <= children
    assert "evaluate.catalogue.fd_clip" in first.data.metrics, first.data.metrics.keys()
    assert "evaluate.reference.catalogue.base.fd_clip" in first.data.metrics
    assert "train_prior.loss_last_epoch" in first.data.metrics
    assert "pretrain.final_loss.unet" in first.data.metrics, first.data.metrics.keys()


def test_each_pipeline_run_registers_its_tuned_model_tagged_with_commit_and_experiment(project, experiments):
    """`dvc repro` registered version 1, the README's two lr experiments versions 2 and 3."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    name = yaml.safe_load((project / "params.yaml").read_text())["serve"]["registered_model"]
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert set(versions) == {"1", "2", "3"}, sorted(versions)
    head = sh(project, "git", "rev-parse", "HEAD").strip()
    assert versions["1"].tags["dvc.exp_name"] == "repro"
    assert versions["1"].tags["mlflow.source.git.commit"] == head
    for version, lr in (("2", "0.001"), ("3", "0.00025")):
        parent = client.get_run(versions[version].tags["fashiondiff.pipeline_run"])
        assert versions[version].tags["dvc.exp_name"] == parent.data.tags["dvc.exp_name"] != "repro"
        assert parent.data.params["lr"] == lr and parent.data.metrics["register.model_version"] == int(version)


@pytest.mark.browser
def test_mlflow_ui_shows_both_experiments_with_lr_and_the_scores(project, experiments):
    """`fashiondiff ui` (what `make ui` runs) in headless Chromium, at the address it prints:
    one row per pipeline run, among them both README experiments with their lr, and the
    catalogue's fd_clip of each as shown in MLflow."""
    import mlflow
    from browser import chromium, wait

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`fashiondiff.role` = 'pipeline'")
    runs = {r.data.tags["dvc.exp_name"]: r for r in parents if r.data.params["lr"] in ("0.001", "0.00025")}
    assert len(runs) == 2, [(r.info.run_name, r.data.params["lr"]) for r in parents]
    # what `make figures` photographs: these two, every param a params.yaml name
    checked = sh(project, sys.executable, "tools/readme_figures.py", "--check").split()
    assert sorted(checked) == sorted(runs), checked
    port = free_port()
    log = project / "ui.log"
    with running(
        [sys.executable, "-m", "fashiondiff", "ui", "--port", str(port)],
        f"http://127.0.0.1:{port}/",
        log=log,
        grace_s=30,
        cwd=project,
        env=project_env(src=project / "src"),
    ) as server:
        address = printed_word(log, f"http://127.0.0.1:{port}/#/", server, limit_s=60)
        assert "workflowType=machine_learning" in address and "viewStateShareKey=" in address
        with chromium(2400, 1000) as browser:
            browser.get(address)
            column = "metrics.`evaluate.catalogue.fd_clip`"
            for name, run in runs.items():
                row = wait(
                    browser,
                    lambda d, n=name: d.find_elements("xpath", f"//div[@role='row'][.//a[normalize-space()='{n}']]"),
                )
                index = row[0].get_attribute("row-index")  # the grid's pinned and scrolled parts share it

                def cell(d, i=index, col=column):
                    found = d.find_elements("css selector", f"div[role='row'][row-index='{i}'] [col-id='{col}']")
                    return found[0].text if found and found[0].text else False

                assert float(wait(browser, cell)) == pytest.approx(
                    run.data.metrics["evaluate.catalogue.fd_clip"], rel=1e-4
                )
                lr = browser.find_elements(
                    "css selector", f"div[role='row'][row-index='{index}'] [col-id='params.`lr`']"
                )
                assert lr and lr[0].text == run.data.params["lr"]
            body = browser.find_element("tag name", "body").text
            assert "evaluate.catalogue.clip_score" in body and "lr" in body
            assert "repro-" in body  # the run `dvc repro` made, a row of its own
            browser.save_screenshot(str(project / "mlflow-ui.png"))


def test_readme_generate_examples_run_as_written(project, experiments):
    """README "Generating and serving", its runnable block as written: every image is written."""
    [commands] = runnable_blocks("README.md", "Generating and serving")
    outputs = run_as_written(project, commands)
    for command in commands[1:]:
        out = re.search(r"--out (\S+)", command).group(1)
        printed = [out, out.replace(".png", ".beside.png")] if "--image" in command else [out]  # the photo beside
        assert all((project / p).is_file() for p in printed) and outputs[command].split() == printed, (
            command,
            outputs[command],
        )


@pytest.mark.parametrize("page", docs_with_runnable_blocks())
def test_docs_runnable_blocks_run_as_written(project, experiments, page):
    """A docs/ page's runnable blocks, as written, after the README's (``experiments``): every
    command succeeds, and each `fashiondiff generate` writes the images it prints."""
    commands = [c for block in runnable_blocks(page) for c in block]
    assert commands, page
    outputs = run_as_written(project, commands)
    for command in commands:
        if command.startswith("fashiondiff generate"):
            printed = outputs[command].split()
            assert printed and all((project / path).is_file() for path in printed), (command, outputs[command])
            assert (project / re.search(r"--out (\S+)", command).group(1)).exists(), command


@pytest.mark.slow
def test_two_experiments_through_dvc_queue_land_in_the_project_store(project, experiments):
    """docs/long-runs.md "Sweeps", its runnable block as written: two `dvc exp run --queue -S lr=...`,
    `dvc queue start -j 2`. Both succeed, rerun the training, evaluation and register stages only
    (the stand-in's pretrain is up to date in DVC's temporary copies: its checkpoints are no
    output), never resume each other's checkpoints, and land in the project's mlflow.db, not in a
    copy DVC deleted: a parent run each, named after the experiment, with its stage runs, every
    loss point and the scores."""
    import time

    import mlflow

    sh(project, "git", "add", "dvc.lock", "standin/dvc.lock", "params.yaml", "reports")  # as the repository has them
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results")
    [commands] = runnable_blocks("docs/long-runs.md", "Sweeps through DVC's queue")
    names = [re.search(r"-n (\S+)", c).group(1) for c in commands if c.startswith("dvc exp run --queue")]
    assert len(names) == 2 and commands[-1] == "dvc queue start -j 2", commands
    started = time.monotonic()
    run_as_written(project, commands)
    while re.search(r"Queued|Running", status := sh(project, str(DVC), "queue", "status")):
        assert time.monotonic() - started < 1800, status
        time.sleep(5)
    print(f"two queued experiments, -j 2: {time.monotonic() - started:.0f} s")
    assert all(re.search(rf"{name}\s.*Success", status) for name in names), status

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    assert exp.artifact_location == (project / "mlartifacts").as_uri()
    shown = sh(project, str(DVC), "exp", "show", "--no-pager", "--csv")
    for name in names:
        log = sh(project, str(DVC), "queue", "logs", name)
        ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
        assert ran == {"train_prior", "train_decoder", "evaluate", "register"}, log
        assert "resumed from" not in log and "waiting for it" not in log, log
        row = next(line for line in shown.splitlines() if line.startswith(f"{name},"))
        rev = row.split(",")[1]
        [parent] = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`dvc.exp_name` = '{name}' and tags.`fashiondiff.role` = 'pipeline'",
        )
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        lr = re.search(r"-n " + re.escape(name) + r" -S lr=(\S+)", " ".join(commands)).group(1)
        assert parent.data.params["lr"] == lr and lr in row
        assert {"evaluate.catalogue.fd_clip", "train_decoder.loss_last_epoch"} <= set(parent.data.metrics)
        children = {
            c.info.run_name: c
            for c in client.search_runs(
                [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
            )
        }
        assert set(children) == {"train_prior", "train_decoder", "evaluate", "register"}
        for kind in ("prior", "decoder"):
            child = children[f"train_{kind}"]
            steps = json.loads(sh(project, "git", "show", f"{rev}:reports/train_{kind}.json"))["steps"]
            assert len(client.get_metric_history(child.info.run_id, "loss")) == steps  # log_every 1: each step
            assert (project / "mlartifacts" / child.info.run_id / "artifacts" / f"train_{kind}.json").is_file()
    assert not list((project / ".dvc/tmp/exps").rglob("mlflow.db"))

    # docs/long-runs.md "From an experiment to people", as written: one experiment's models applied,
    # drawn from, and found in the registry as the version its own run registered
    [apply] = runnable_blocks("docs/long-runs.md", "From an experiment to people")
    name = re.search(r"^dvc exp apply (\S+)$", apply[0]).group(1)
    assert name in names, apply
    rev = next(line for line in shown.splitlines() if line.startswith(f"{name},")).split(",")[1]
    outputs = run_as_written(project, apply)
    theirs = yaml.safe_load(sh(project, "git", "show", f"{rev}:dvc.lock"))["stages"]
    ours = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    for stage in ("train_prior", "train_decoder", "evaluate"):
        assert ours[stage]["outs"] == theirs[stage]["outs"], stage
    assert stale_stages(project) == {"register"}  # the applied outputs are what its dvc.lock says
    out = re.search(r"--out (\S+)", apply[1]).group(1)
    assert (project / out).is_file() and outputs[apply[1]].split() == [out]
    [version] = [
        v for v in client.search_model_versions("name = 'fashiondiff-kandinsky'") if v.tags.get("dvc.exp_name") == name
    ]
    assert f"fashiondiff-kandinsky version {version.version} (" in outputs[apply[2]], outputs[apply[2]]
    assert "not registered again" in outputs[apply[2]], outputs[apply[2]]


def test_a_cached_repro_s_parent_run_carries_the_scores_of_its_outputs(project):
    """After a commit, `dvc repro` finds every stage up to date and runs `register` alone, under a
    new parent run (a new commit: a new pipeline key). Its scores are there all the same, finite:
    `register` logs each stage's summary from the stage's reports (its deps), under the names the
    stage logs them with (the MLflow UI's columns) and with the reports' values."""
    import math

    import mlflow

    from fashiondiff.evaluate.summary import summary_metrics as evaluate_summary
    from fashiondiff.tracking import parent_keys
    from fashiondiff.training_summary import summary_metrics as training_summary

    sh(project, "git", "add", "dvc.lock", "standin/dvc.lock", "reports")  # as a user commits a run
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "--allow-empty", "-qm", "run")
    out = sh(project, str(DVC), "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"register"}, out

    def report(name: str) -> dict:
        return json.loads((project / "reports" / name).read_text())

    expected = {
        **parent_keys("train_prior", training_summary(report("train_prior.json"))),
        **parent_keys("train_decoder", training_summary(report("train_decoder.json"))),
        **parent_keys("evaluate", evaluate_summary(report("metrics.json"), report("evaluation.json"))),
    }
    assert {
        "evaluate.catalogue.fd_clip",
        "evaluate.generic.clip_score",
        "evaluate.reference.catalogue.base.fd_clip",
        "train_prior.loss_last_epoch",
        "train_decoder.val_loss",
    } <= set(expected)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    head = sh(project, "git", "rev-parse", "HEAD").strip()
    [parent] = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`fashiondiff.role` = 'pipeline' and "
        f"tags.`mlflow.source.git.commit` = '{head}' and tags.`dvc.exp_name` = 'repro'",
    )
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert [c.info.run_name for c in children] == ["register"]
    found = {k: parent.data.metrics.get(k) for k in expected}
    assert found == expected
    assert all(math.isfinite(v) for v in found.values()), found


@pytest.mark.slow
def test_training_options_rerun_the_trainings_and_what_follows_only(project, experiments):
    """Issue 31's check: `dvc exp run -S train.min_snr_gamma=5 -S train.noise_offset=0.05` (in a
    temporary copy) runs the two trainings, evaluate and register and nothing before them, ends
    with other weights than the baseline's, and MLflow records both params."""
    import mlflow

    sh(project, "git", "add", "-A")
    sh(project, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline", "--allow-empty")
    out = sh(
        project,
        str(DVC),
        "exp",
        "run",
        "--temp",
        "-n",
        "snr-offset",
        "-S",
        "train.min_snr_gamma=5",
        "-S",
        "train.noise_offset=0.05",
    )
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_prior", "train_decoder", "evaluate", "register"}, out
    shown = sh(project, str(DVC), "exp", "show", "--no-pager", "--csv")
    rev = next(line for line in shown.splitlines() if line.startswith("snr-offset,")).split(",")[1]
    theirs = yaml.safe_load(sh(project, "git", "show", f"{rev}:dvc.lock"))["stages"]
    ours = yaml.safe_load(sh(project, "git", "show", "HEAD:dvc.lock"))["stages"]
    for stage in ("train_prior", "train_decoder"):
        assert theirs[stage]["outs"][0]["md5"] != ours[stage]["outs"][0]["md5"], stage
    for stage in ("extract@train", "embed@train"):
        assert theirs[stage] == ours[stage], stage
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    [parent] = client.search_runs(
        [exp.experiment_id], filter_string="tags.`dvc.exp_name` = 'snr-offset' and tags.`fashiondiff.role` = 'pipeline'"
    )
    assert float(parent.data.params["train.min_snr_gamma"]) == 5.0
    assert float(parent.data.params["train.noise_offset"]) == 0.05


def test_repro_force_is_bit_for_bit_reproducible(project):
    """docs/reproducibility.md's check, as written (`dvc repro --force`, then `md5sum -c` of
    both lock files and metrics.json); and here, the md5 of every output compared one by one."""
    metrics = (project / "reports/metrics.json").read_bytes()
    md5s = lock_md5s(project)
    assert {"models/base/prior", "data/cache/train", "models/prior", "reports/samples"} <= set(md5s)
    [commands] = runnable_blocks("docs/reproducibility.md")
    assert "dvc repro --force" in commands, commands
    checked = run_as_written(project, commands)[commands[-1]]
    assert checked.split() == ["dvc.lock:", "OK", "standin/dvc.lock:", "OK", "reports/metrics.json:", "OK"], checked
    assert (project / "reports/metrics.json").read_bytes() == metrics
    changed = {p for p, md5 in lock_md5s(project).items() if md5s[p] != md5}
    assert not changed, sorted(changed)


def test_the_documented_activated_venv_form_works(project):
    """README: `source .venv/bin/activate`, then dvc (stage commands call `python` from PATH)."""
    venv = Path(sys.executable).parent.parent
    if not (project / ".venv").exists():  # the README blocks above made it already
        (project / ".venv").symlink_to(venv)
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = ":".join(p for p in os.environ["PATH"].split(":") if not p.startswith(str(venv)))
    out = subprocess.run(
        ["bash", "-c", "source .venv/bin/activate && dvc status && python -c 'import fashiondiff'"],
        cwd=project,
        env=bare,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
