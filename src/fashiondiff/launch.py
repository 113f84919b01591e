"""Several nodes from one command: a heavy stage on every node of a Slurm allocation.

Usage, as params' ``compute.launcher`` (dvc.yaml appends ``stages/<stage>.py`` and its arguments),
with ``dvc exp run`` inside the allocation (an sbatch script; docs/distributed.md)::

    dvc exp run -S "compute.launcher=python -m fashiondiff.launch --nodes 2 --processes-per-node 8"

Other ``accelerate launch`` options (``--config_file``, ``--mixed_precision``) may follow this
module's own; the ones it sets itself (:data:`SET_HERE`) may not.

Run by DVC, it checks the allocation (``--nodes`` is the job's node count: the command, and so
dvc.lock, records how many processes made the outputs, as ``--num_processes`` does on one
machine) and starts itself once per node with ``srun``. Each of those (marked by
``FASHIONDIFF_LAUNCH_NODE``) runs ``accelerate launch`` with the node's rank, ``SLURM_NODEID``,
and the main process at ``SLURM_LAUNCH_NODE_IPADDR``: the node where srun, and so DVC, runs,
which must be node 0 (node 0 checks it). Process 0 writes the outputs, and DVC looks for them
where it runs. sbatch runs the script on "the first node in the allocation" unless told otherwise
(sbatch(1), ``--batch``). The variables are srun's (srun(1), OUTPUT ENVIRONMENT VARIABLES).

The exit status is srun's: the highest of the nodes' (srun(1), RETURN VALUE). srun waits for every
node (``--kill-on-bad-exit=0``, whatever slurm.conf's KillOnBadExit says): when the stages stop on a
signal, the first node to exit would otherwise have Slurm kill the others while they save. A node
that fails outright is noticed by the others at their next exchange with it (embed and evaluate:
the hand-over's barrier; measured once on tests/test_launch.py's two simulated nodes: node 1's
embed process killed, node 0's stopped 3.2 s later with its one line).

Signals. srun passes SIGTERM on to its tasks as SIGKILL, and SIGUSR1 as is (srun(1),
``--ignore-signals``): so a SIGTERM or SIGINT sent to this process goes to srun as SIGUSR1, and each
node turns it into SIGTERM to its ``accelerate launch``, whose agent passes it to every process, as
on one machine: the stages save what they finished and stop. The node's processes ignore SIGUSR1
themselves (its default action would end them), so ``#SBATCH --signal=USR1@300``, which Slurm sends
to the processes of the job's steps (sbatch(1)), takes the same path. Slurm's own SIGTERM (the time
limit, ``scancel``) reaches every process of the step directly, so a node does not pass on a SIGTERM
or SIGINT it receives: the processes under it have theirs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fashiondiff.errors import PipelineError, cli

NODE_MARK = "FASHIONDIFF_LAUNCH_NODE"  # "1" in the processes srun starts, one per node
HOST_MARK = "FASHIONDIFF_LAUNCH_HOST"  # the host name of the node where DVC runs (node 0's, checked)
# The main process's port when --port is not given: from the job and step ids (the same on every
# node of a step), so that two steps of one job at once (`dvc queue start -j 2` in one allocation)
# and two jobs sharing node 0 seldom meet. Below Linux's ephemeral range (32768-60999), from which
# the system picks the local ports of outgoing connections.
PORT_BASE, PORT_SPAN = 20000, 10000
# accelerate launch options set here, from the allocation; refused among the options passed on
SET_HERE = (
    "--multi_gpu",
    "--num_machines",
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
    "--num_processes",
)
_OWN = {"--nodes", "--processes-per-node", "--port"}  # this module's options, each with a value


@dataclass(frozen=True)
class Layout:
    """How many nodes, processes on each, and the main process's port (None: from the job)."""

    nodes: int
    processes_per_node: int
    port: int | None = None

    @property
    def processes(self) -> int:
        return self.nodes * self.processes_per_node


def parse(argv: Sequence[str]) -> tuple[Layout, list[str]]:
    """This module's options, which come first, and the rest: accelerate launch options, the stage
    script and its arguments, passed on as they are."""
    parser = argparse.ArgumentParser(
        prog="python -m fashiondiff.launch", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--nodes", type=int, required=True, help="the allocation's node count (checked)")
    parser.add_argument("--processes-per-node", type=int, required=True, help="processes per node: its GPUs")
    parser.add_argument("--port", type=int, help="the main process's port (default: from the job and step ids)")
    end = 0
    while end < len(argv) and (argv[end] in ("-h", "--help") or argv[end].split("=", 1)[0] in _OWN):
        end += 1 if "=" in argv[end] or argv[end] in ("-h", "--help") else 2
    args = parser.parse_args(argv[:end])
    layout, rest = Layout(args.nodes, args.processes_per_node, args.port), list(argv[end:])
    if layout.nodes < 1 or layout.processes_per_node < 1:
        raise PipelineError(
            f"fashiondiff.launch: --nodes {layout.nodes} --processes-per-node "
            f"{layout.processes_per_node}: both must be at least 1"
        )
    script = next((i for i, arg in enumerate(rest) if arg.endswith(".py")), None)
    if script is None:
        raise PipelineError(f"fashiondiff.launch: no stage script (a .py file) in {' '.join(rest) or 'the arguments'}")
    clash = sorted({a.split("=", 1)[0] for a in rest[:script]} & set(SET_HERE))
    if clash:
        raise PipelineError(
            f"fashiondiff.launch sets {', '.join(clash)} itself, from the allocation: "
            "leave them out of compute.launcher"
        )
    return layout, rest


def srun_command(layout: Layout, argv: Sequence[str]) -> list[str]:
    """srun starting this module (with ``argv``) once on each node of the allocation."""
    n = layout.nodes
    return [
        "srun",
        f"--nodes={n}",
        f"--ntasks={n}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=0",
        "--export=ALL",
        sys.executable,
        "-m",
        "fashiondiff.launch",
        *argv,
    ]


def node_command(layout: Layout, rest: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``accelerate launch`` for this node of the step, from srun's variables in ``env``."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        str(layout.nodes),
        "--machine_rank",
        _slurm(env, "SLURM_NODEID"),
        "--main_process_ip",
        _slurm(env, "SLURM_LAUNCH_NODE_IPADDR"),
        "--main_process_port",
        str(layout.port or derived_port(env)),
        "--num_processes",
        str(layout.processes),
        *rest,
    ]


def derived_port(env: Mapping[str, str]) -> int:
    """The main process's port from the job and step ids (see :data:`PORT_BASE`)."""
    job, step = int(_slurm(env, "SLURM_JOB_ID")), int(env.get("SLURM_STEP_ID", "0"))
    return PORT_BASE + (job * 100 + step) % PORT_SPAN


def fan_out(layout: Layout, argv: Sequence[str], env: Mapping[str, str]) -> int:
    """On the node where DVC runs: check the allocation, run srun, return its exit status."""
    if "SLURM_JOB_ID" not in env:
        raise PipelineError(
            "fashiondiff.launch: not inside a Slurm allocation (no SLURM_JOB_ID): run dvc "
            "from an sbatch script (docs/distributed.md), or use accelerate launch on one machine"
        )
    allocated = env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES"))
    if allocated != str(layout.nodes):
        raise PipelineError(
            f"fashiondiff.launch: --nodes {layout.nodes}, but Slurm job {env['SLURM_JOB_ID']} "
            f"has {allocated} (SLURM_JOB_NUM_NODES): set --nodes to the job's node count"
        )
    node_env = {**env, NODE_MARK: "1", HOST_MARK: socket.gethostname()}
    try:
        return run(
            srun_command(layout, argv), node_env, relay={signal.SIGTERM: signal.SIGUSR1, signal.SIGINT: signal.SIGUSR1}
        )
    except FileNotFoundError:
        raise PipelineError("fashiondiff.launch: no srun on PATH (Slurm's command)") from None


def on_node(layout: Layout, rest: Sequence[str], env: Mapping[str, str]) -> int:
    """On each node, under srun: run ``accelerate launch`` for this node, return its exit status."""
    if env.get("SLURM_NODEID") == "0" and socket.gethostname() != env.get(HOST_MARK):
        raise PipelineError(
            f"fashiondiff.launch: node 0 of the step is {socket.gethostname()}, but DVC runs on "
            f"{env.get(HOST_MARK)}: process 0 writes the outputs on node 0, where DVC must look "
            "for them; run dvc in the sbatch script (it runs on the allocation's first node)"
        )
    return run(
        node_command(layout, rest, env),
        env,
        relay={signal.SIGUSR1: signal.SIGTERM},
        ignore=(signal.SIGTERM, signal.SIGINT),
        child_ignores=(signal.SIGUSR1,),
    )


def run(
    cmd: Sequence[str],
    env: Mapping[str, str],
    relay: Mapping[int, int],
    ignore: Sequence[int] = (),
    child_ignores: Sequence[int] = (),
) -> int:
    """Run ``cmd`` to its end; while it runs, signal ``s`` sent here goes to it as ``relay[s]``, and
    the signals in ``ignore`` do nothing here. ``child_ignores``: signals it starts ignoring. Its exit
    status, 128 + N when signal N ended it (as a shell reports it)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in child_ignores}  # inherited through exec
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in relay:
        signal.signal(sig, lambda signum, frame: proc.send_signal(relay[signum]))  # none once it has ended
    for sig in ignore:
        signal.signal(sig, lambda signum, frame: None)
    status = proc.wait()
    return 128 - status if status < 0 else status


def _slurm(env: Mapping[str, str], name: str) -> str:
    if name not in env:
        raise PipelineError(f"fashiondiff.launch: {name} is not set: this node was not started by srun")
    return env[name]


@cli
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    layout, rest = parse(argv)
    if os.environ.get(NODE_MARK) == "1":
        return on_node(layout, rest, os.environ)
    return fan_out(layout, argv, os.environ)


if __name__ == "__main__":
    sys.exit(main())
