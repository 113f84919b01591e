"""``fashiondiff sweep-one``: one experiment of a sweep, in a clone of its own, pushed when done.

Usage::

    fashiondiff sweep-one sweep.yaml 1            # the sweep file's experiment 1 (counting from 0)
    fashiondiff sweep-one sweep.yaml              # in a Slurm array task: experiment $SLURM_ARRAY_TASK_ID
    fashiondiff sweep-one sweep.yaml 1 --gpus 0,1,2,3 --per-run 2   # several at once on one machine

DVC's way past one machine (docs/long-runs.md, "Sweeps over machines"): each experiment runs in
a clone of the project's git remote (``<workdir>/<name>``), ``dvc pull`` fetches the baseline's
outputs from the project's DVC remote, ``dvc exp run -n NAME -S ...`` runs what the settings make
stale, and ``dvc exp push origin NAME`` sends the experiment's git ref to the git remote and its
outputs to the DVC remote, where any clone's ``dvc exp pull origin`` finds them. With
``mlflow.tracking_uri`` in the sweep file every experiment reports to that server (one live view).

The sweep file (YAML)::

    git_remote: /shared/git/fashiondiff.git   # what each experiment clones and pushes to
    rev: main                                 # optional: the baseline (default: the remote's HEAD)
    workdir: /shared/sweeps/lr                # optional: the clones' folder (default: sweeps)
    mlflow:                                   # optional: a tracking server for every experiment
      tracking_uri: http://tracking-host:5000
    experiments:
      - name: lr-1e-3                         # dvc exp run -n
        params: {lr: 0.001}                   # dvc exp run -S lr=0.001
      - name: lr-1e-4
        params: {lr: 0.0001}

Run again with the same index, it reuses the clone: a preempted experiment resumes (its
checkpoints live in the clone), a finished one is only pushed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fashiondiff.commands.run import as_flag
from fashiondiff.errors import PipelineError
from fashiondiff.gpu_lease import default_lock_dir, leased, parse_ids
from fashiondiff.processes import project_env

# .dvc/config's remote `shared` as committed: a path no one has, to be replaced with
# `dvc remote modify shared url ...`. Refused here: as root, DVC would create it and "push".
PLACEHOLDER_REMOTE = "/path/to/shared/dvc-storage"


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a git ref's and a folder's name
    params: dict[str, Any] = {}


class Tracking(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    git_remote: str
    rev: str | None = None
    workdir: str = "sweeps"
    mlflow: Tracking | None = None
    experiments: list[Experiment] = Field(min_length=1)


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "sweep-one",
        help="run one experiment of a sweep file in a clone of its own "
        "and push it (a Slurm array task, or a plain host)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("sweep", type=Path, help="the sweep file (YAML)")
    parser.add_argument("index", nargs="?", type=int, help="which experiment, from 0 (default: $SLURM_ARRAY_TASK_ID)")
    parser.add_argument(
        "--gpus",
        type=parse_ids,
        metavar="IDS",
        help="this machine's GPU ids to share among the sweep-one runs on it, e.g. 0,1,2,3: "
        "this run leases --per-run of them and sees only those (CUDA_VISIBLE_DEVICES)",
    )
    parser.add_argument("--per-run", type=int, default=1, metavar="N", help="GPUs per experiment (default 1)")
    parser.add_argument(
        "--lock-dir",
        type=Path,
        default=None,
        help="where the GPU leases' lock files live (default: a folder of yours under /tmp)",
    )
    parser.set_defaults(func=run)


def read_sweep(path: Path) -> SweepFile:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "the file"
        raise PipelineError(f"{path}: {key}: {error['msg']}") from None
    names = [e.name for e in sweep.experiments]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: experiments: names must differ ({', '.join(names)})")
    return sweep


def chosen(sweep: SweepFile, index: int | None, path: Path) -> Experiment:
    """The experiment ``index`` (else $SLURM_ARRAY_TASK_ID) names."""
    if index is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task is None:
            raise PipelineError(
                f"sweep-one {path}: give the experiment's INDEX, or run it as a Slurm array task (SLURM_ARRAY_TASK_ID)"
            )
        if not task.isdigit():
            raise PipelineError(f"SLURM_ARRAY_TASK_ID={task}: expected an experiment's index, from 0")
        index = int(task)
    if not 0 <= index < len(sweep.experiments):
        raise PipelineError(
            f"{path}: no experiment {index}: it has {len(sweep.experiments)} (0 to {len(sweep.experiments) - 1})"
        )
    return sweep.experiments[index]


def run(args: argparse.Namespace) -> None:
    sweep = read_sweep(args.sweep)
    experiment = chosen(sweep, args.index, args.sweep)
    clone = Path(os.path.expandvars(sweep.workdir)).expanduser().resolve() / experiment.name
    env = project_env(src=clone / "src")  # the clone's own code runs its stages, not the venv's copy
    fresh = not (clone / ".git").exists()
    print(f"sweep-one: {experiment.name} ({args.sweep}) in {clone}", flush=True)
    if fresh:
        cloned(sweep, clone, env)
    else:
        print(f"sweep-one: reusing {clone} (a stopped run resumes)", flush=True)
    remote = dvc_remote(clone, env)
    if finished(clone, experiment.name, env):
        print(f"sweep-one: {experiment.name} ran already in {clone}: pushing it", flush=True)
    else:
        if fresh:  # the baseline's outputs; a rerun's clone has them, and its dvc.lock lists newer ones
            call(["dvc", "pull"], clone, env, hint=f"is the baseline pushed to DVC remote {remote} (dvc push)?")
        settings = dict(experiment.params)
        if sweep.mlflow:
            settings["mlflow.tracking_uri"] = sweep.mlflow.tracking_uri
        command = ["dvc", "exp", "run", "--pull", "-n", experiment.name]
        command += [flag for key, value in settings.items() for flag in ("-S", as_flag(key, value))]
        with gpus(args, env):
            call(command, clone, env)
    call(["dvc", "exp", "push", "origin", experiment.name], clone, env)


def cloned(sweep: SweepFile, clone: Path, env: dict[str, str]) -> None:
    """``clone``: the git remote cloned, ``rev`` checked out. Made beside it and renamed into
    place, so that a folder at ``clone`` is always a finished clone (a rerun reuses it as is)."""
    partial = clone.with_name(f".{clone.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # a clone stopped half-way
    partial.parent.mkdir(parents=True, exist_ok=True)
    call(["git", "clone", "-q", sweep.git_remote, str(partial)], partial.parent, env)
    if sweep.rev:
        call(["git", "checkout", "-q", sweep.rev], partial, env)
    partial.rename(clone)


@contextlib.contextmanager
def gpus(args: argparse.Namespace, env: dict[str, str]):
    """With --gpus: this run's lease, put into ``env`` as CUDA_VISIBLE_DEVICES for the block."""
    if not args.gpus:
        yield
        return
    with leased(
        args.gpus,
        args.per_run,
        args.lock_dir or default_lock_dir(),
        say=lambda line: print(f"sweep-one: {line}", flush=True),
    ) as ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        print(f"sweep-one: GPUs {env['CUDA_VISIBLE_DEVICES']} (CUDA_VISIBLE_DEVICES)", flush=True)
        yield


def dvc_remote(clone: Path, env: dict[str, str]) -> str:
    """The clone's default DVC remote's name; an error when there is none or it is the placeholder."""
    named = subprocess.run(["dvc", "remote", "default"], cwd=clone, env=env, capture_output=True, text=True)
    name = named.stdout.strip() if named.returncode == 0 else ""
    if not name:
        raise PipelineError(
            f"{clone}: no default DVC remote: `dvc remote add -d NAME URL` in the project, commit .dvc/config and push"
        )
    if output(["dvc", "config", f"remote.{name}.url"], clone, env).strip() == PLACEHOLDER_REMOTE:
        raise PipelineError(
            f"{clone}: DVC remote {name} is still {PLACEHOLDER_REMOTE}: point it at shared "
            f"storage (dvc remote modify {name} url ...), commit .dvc/config and push"
        )
    return name


def finished(clone: Path, name: str, env: dict[str, str]) -> bool:
    """Whether the clone holds experiment ``name`` of its HEAD (DVC's ref for it)."""
    head = output(["git", "rev-parse", "HEAD"], clone, env).strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"  # how DVC names an experiment's ref
    return bool(output(["git", "for-each-ref", ref], clone, env).strip())


def call(command: list[str], cwd: Path, env: dict[str, str], hint: str = "") -> None:
    """Run ``command`` in ``cwd``, its output passed through; a failure is one line with its status."""
    print(f"$ {shlex.join(command)}", flush=True)
    code = subprocess.call(command, cwd=cwd, env=env)
    if code:
        shown = 6  # up to `dvc exp run --pull -n NAME`: the settings that follow can be many
        error = PipelineError(
            f"{shlex.join(command[:shown])}{' ...' if len(command) > shown else ''} in {cwd} "
            f"exited with {code}{': ' + hint if hint else ''}"
        )
        error.exit_code = code if code > 0 else 128 - code  # killed by a signal: the shell's 128 + N
        raise error


def output(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines() or [""]
        raise PipelineError(f"{shlex.join(command)} in {cwd} exited with {result.returncode}: {lines[-1]}")
    return result.stdout
