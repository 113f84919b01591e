"""`python -m fashiondiff.launch`: a stage on every node of a Slurm allocation. No Slurm here: a fake
srun (tests/fake_slurm/srun, first on PATH) starts the launcher as two "nodes" on this machine
(machine ranks 0 and 1, 127.0.0.1, one gloo process each). Under it, a SIGTERM to the launcher
stops embed on both nodes, and the rerun writes the one-process cache; train_prior trains what
`accelerate launch --num_processes 2` on one machine trains; outside Slurm, or with the wrong node
count, it refuses in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_fixtures import REPO, run_stage, stage_params
from test_spread import error_lines, same_files, start, wait_for
from test_train import train_args

from fashiondiff.errors import PipelineError
from fashiondiff.launch import HOST_MARK, PORT_BASE, PORT_SPAN, Layout, fan_out, node_command, on_node, parse
from fashiondiff.processes import accelerate_launch, free_port, project_env

FAKE_SLURM = REPO / "tests" / "fake_slurm"
GLOO = {"ACCELERATE_USE_CPU": "1"}  # accelerate's processes on the CPU
ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2"}  # what sbatch sets in the batch script
PROCESS_TIMEOUT = 120  # compute.timeout_s: a hang fails the test, not the suite


def two_nodes() -> tuple[list[str], dict[str, str]]:
    """The launcher on two fake nodes of one process each, and the environment to run it in."""
    launcher = [
        sys.executable,
        "-m",
        "fashiondiff.launch",
        "--nodes",
        "2",
        "--processes-per-node",
        "1",
        "--port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    return launcher, {"PATH": f"{FAKE_SLURM}{os.pathsep}{project_env()['PATH']}", **ALLOCATION, **GLOO}


# --- without processes ------------------------------------------------------------------------


def test_outside_slurm_it_refuses_in_one_line():
    env = {k: v for k, v in project_env().items() if not k.startswith("SLURM")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fashiondiff.launch",
            "--nodes",
            "2",
            "--processes-per-node",
            "8",
            "stages/embed.py",
            "data/extracted/train",
            "train",
            "data/cache/train",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: fashiondiff.launch: not inside a Slurm allocation (no SLURM_JOB_ID)")
    assert len(result.stderr.splitlines()) == 1


def test_nodes_must_be_the_allocation_s_and_its_own_options_are_refused():
    with pytest.raises(PipelineError, match=r"--nodes 2, but Slurm job 7 has 4 \(SLURM_JOB_NUM_NODES\)"):
        fan_out(Layout(2, 8), ["--nodes", "2"], {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "4"})
    with pytest.raises(PipelineError, match="sets --num_processes itself"):
        parse(["--nodes", "2", "--processes-per-node", "8", "--num_processes", "4", "stages/embed.py", "a"])
    assert parse(
        [
            "--nodes=2",
            "--processes-per-node",
            "8",
            "--config_file",
            "fsdp.yaml",
            "stages/train_prior.py",
            "--cache",
            "c",
        ]
    ) == (Layout(2, 8), ["--config_file", "fsdp.yaml", "stages/train_prior.py", "--cache", "c"])


def test_each_node_launches_its_rank_with_node_0_as_the_main_process():
    step = {"SLURM_JOB_ID": "912345", "SLURM_STEP_ID": "3", "SLURM_LAUNCH_NODE_IPADDR": "10.1.2.3"}
    commands = [
        node_command(Layout(4, 8), ["stages/embed.py", "x"], {**step, "SLURM_NODEID": str(n)}) for n in range(4)
    ]

    def option(cmd, name):
        return cmd[cmd.index(name) + 1]

    assert [option(c, "--machine_rank") for c in commands] == ["0", "1", "2", "3"]
    for cmd in commands:
        assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and cmd[-2:] == ["stages/embed.py", "x"]
        assert (option(cmd, "--num_machines"), option(cmd, "--num_processes")) == ("4", "32")
        assert option(cmd, "--main_process_ip") == "10.1.2.3"
    ports = {option(c, "--main_process_port") for c in commands}
    assert len(ports) == 1 and PORT_BASE <= int(ports.pop()) < PORT_BASE + PORT_SPAN
    other_step = node_command(Layout(4, 8), ["s.py"], {**step, "SLURM_NODEID": "0", "SLURM_STEP_ID": "4"})
    assert option(other_step, "--main_process_port") != option(commands[0], "--main_process_port")


def test_node_0_elsewhere_than_dvc_is_refused():
    """Process 0 writes the outputs on node 0: DVC, which looks for them, must run there."""
    with pytest.raises(PipelineError, match="node 0 of the step is .*, but DVC runs on login-1"):
        on_node(Layout(2, 8), ["stages/embed.py"], {"SLURM_NODEID": "0", HOST_MARK: "login-1"})


# --- two simulated nodes ----------------------------------------------------------------------


@pytest.mark.slow  # two trainings of two gloo processes
def test_train_prior_on_two_nodes_trains_what_two_processes_on_one_machine_train(tmp_path, tiny_base, train_cache):
    """The same split of the batches (process i is rank i either way), so the same steps and
    weights, bit for bit; the stage itself checks that the ranks end with identical weights."""
    params = stage_params(tiny_base)
    launcher, env = two_nodes()
    nodes, machine = tmp_path / "nodes", tmp_path / "machine"
    result = run_stage(
        nodes, params, "train_prior.py", *train_args(nodes, "prior", train_cache), launcher=launcher, **env
    )
    assert "2 processes ended with identical weights" in result.stdout + result.stderr
    run_stage(
        machine,
        params,
        "train_prior.py",
        *train_args(machine, "prior", train_cache),
        launcher=accelerate_launch(2),
        **GLOO,
    )
    a, b = (json.loads((root / "prior.json").read_text()) for root in (nodes, machine))
    assert a["steps"] == b["steps"] > 0 and a["loss_last_epoch"] == b["loss_last_epoch"]
    weights = sorted(p.relative_to(nodes) for p in (nodes / "models/prior").rglob("*.safetensors"))
    assert weights == sorted(p.relative_to(machine) for p in (machine / "models/prior").rglob("*.safetensors"))
    for path in weights:
        assert (nodes / path).read_bytes() == (machine / path).read_bytes(), path


def stage_processes(cwd: Path) -> dict[int, int]:
    """Rank -> pid of the stage processes running in ``cwd`` on any node (not their loaders)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd") != str(cwd.resolve()):
                continue
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if b"RANK" in env:
            found[int(proc.name)] = (int(env[b"RANK"]), parent)
    return {rank: pid for pid, (rank, parent) in found.items() if parent not in found}


def pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits for the (stopped) process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def messages(stderr: str) -> str:
    """What the processes said, without progress bars and traceback bodies (for a failure)."""
    lines = stderr.replace("\r", "\n").splitlines()
    return "\n".join(line for line in lines if line.strip() and not line.startswith(" ") and "it/s]" not in line)


def stopped(pid: int) -> bool:
    """Whether ``pid`` has stopped (SIGSTOP): until then a SIGTERM sent after it may be taken
    first (the lower signal number), and is no longer pending once it stops."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.slow  # two gloo processes, stopped and resumed
def test_embed_on_two_nodes_stops_on_sigterm_and_resumes_to_the_one_process_cache(
    tmp_path, tiny_base, extracted, train_cache
):
    """srun would pass SIGTERM on as SIGKILL: the launcher sends it SIGUSR1, which each node
    turns into SIGTERM for its processes. Both stop with the stage's own line (finished batches
    kept); the rerun under the launcher finishes the cache, and every batch of it, encoded on the
    two nodes, is what one process writes, file for file. (Once the captions are done, the stage
    processes are held with SIGSTOP until the SIGTERM waits for both: the run cannot finish first.)"""
    launcher, env = two_nodes()
    params = stage_params(tiny_base, **{"compute.timeout_s": PROCESS_TIMEOUT})
    proc = start(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", launcher=launcher, **env)
    ranks = wait_for(
        lambda: (found := stage_processes(tmp_path)).keys() == {0, 1} and found, "both stage processes", proc=proc
    )

    def captions_done():  # the image batches, a hand-over each, are still to come: neither process has ended
        try:
            progress = json.loads((tmp_path / ".cache.partial" / "progress.json").read_text())
            return progress["caption_batches"] == [[0, 3]]
        except (OSError, ValueError, KeyError):
            return False

    wait_for(captions_done, "finished captions", proc=proc)
    # each stage process with its image loader: one stopped alone would be continued by the kernel
    # (SIGCONT to an orphaned process group with a stopped member) once the loader died of the SIGTERM
    groups = [os.getpgid(pid) for pid in ranks.values()]
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    try:
        wait_for(lambda: all(stopped(pid) for pid in ranks.values()), "both stage processes stopped", 30)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: all(pending(pid, signal.SIGTERM) for pid in ranks.values()), "SIGTERM on both nodes", 30)
    finally:
        for group in groups:
            os.killpg(group, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    # each node's status is accelerate launch's: 1 after its agent was stopped by a signal (as on one
    # machine, tests/test_preemption.py); the stages' own are 143. Each process ends with one line:
    # stopped by SIGTERM, or (its loader, also signalled, or the other process gone first) the loss
    # of either; every one keeps the finished batches.
    assert proc.returncode != 0 and "fake srun: 2 nodes exited" in stderr, messages(stderr)
    lines = [line for line in error_lines(stderr) if line.startswith("error: embed: ")]
    print("\n".join(lines))
    assert len(lines) == 2 and all("rerun to resume" in line for line in lines), messages(stderr)
    assert not (tmp_path / "cache").exists()
    resumed = run_stage(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", launcher=launcher, **env)
    assert "embed: resuming" in resumed.stdout and "8/8 captions" in resumed.stdout
    assert "fake srun: 2 nodes exited [0, 0]" in resumed.stderr
    assert len(same_files(train_cache, tmp_path / "cache")) == 17
