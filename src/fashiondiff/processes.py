"""Processes that the commands, the tools and the tests start: a free port, the environment of
the project's own programs, and servers started in a session of their own, waited for and
stopped with their children. No stage imports this module.

Usage::

    port = free_port()
    with running(["mlflow", "server", "--port", str(port)], f"http://127.0.0.1:{port}/",
                 log=Path("server.log"), env=project_env()) as proc:
        ...                                   # the server answers here; stopped on leaving
    subprocess.run(["dvc", "repro"], cwd=copy, env=project_env(src=copy / "src"))  # a copied project
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from fashiondiff.runtime import MKL_REPRODUCIBLE

SRC = Path(__file__).resolve().parents[1]  # the folder that holds this package (src/)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(processes: int) -> list[str]:
    """The command that starts a stage in ``processes`` processes on this machine, as a
    multi-process ``compute.launcher`` would: ``accelerate launch`` on a free port, without mixed
    precision or dynamo (with ACCELERATE_USE_CPU=1 in the environment: gloo on the CPU). One
    process: ``python`` itself. For tests and benchmarks that run the stages' own scripts."""
    if processes == 1:
        return [sys.executable]
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]


def project_env(src: Path | None = None, **extra: str) -> dict[str, str]:
    """This environment, set up for the project's programs: the package in ``src`` importable (by
    default this one; a copied project names its own), this Python's programs first on PATH (dvc,
    and the ``python`` that stage commands call), one thread per process, MKL's reproducible mode
    (``fashiondiff.runtime.MKL_REPRODUCIBLE``), no Hub access, no
    telemetry, and outside any DVC run (no inherited ``DVC_*``: a program started here is no
    stage of a run that may have started us); ``extra`` last."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DVC_")}
    env.update(
        PYTHONPATH=str(src or SRC),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="1",
        GRADIO_ANALYTICS_ENABLED="False",
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    for key, value in MKL_REPRODUCIBLE.items():
        env.setdefault(key, value)
    return {**env, **extra}


def start_group(cmd: Sequence[str], log: Path | None = None, **popen) -> subprocess.Popen:
    """Start ``cmd`` in a session (process group) of its own, its output into ``log`` if given:
    stop it, children included, with :func:`stop_process_group`."""
    if log is None:
        return subprocess.Popen(list(cmd), start_new_session=True, **popen)
    with open(log, "w") as out:
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen)


def wait_until_up(url: str, proc: subprocess.Popen, limit_s: float, log: Path | None = None) -> None:
    """Return once ``url`` answers 200; RuntimeError (with the log's tail) if ``proc`` exits first
    or ``limit_s`` passes."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        _alive(proc, log)
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {limit_s:g} s{_tail(log)}")


def printed_word(log: Path, marker: str, proc: subprocess.Popen, limit_s: float) -> str:
    """The first word of ``log`` that contains ``marker`` (an address a server prints once it is
    up), once ``proc`` has written it; RuntimeError (with the log's tail) if ``proc`` exits first
    or ``limit_s`` passes."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = re.search(rf"\S*{re.escape(marker)}\S*", Path(log).read_text(errors="replace"))
        if found:
            return found.group(0)
        _alive(proc, log)
        time.sleep(0.3)
    raise RuntimeError(f"{_name(proc)} printed no {marker!r} within {limit_s:g} s{_tail(log)}")


@contextlib.contextmanager
def running(
    cmd: Sequence[str], url: str, limit_s: float = 120, log: Path | None = None, grace_s: float = 15, **popen
) -> Iterator[subprocess.Popen]:
    """``cmd`` started in its own group, once ``url`` answers; stopped with its children on leaving."""
    proc = start_group(cmd, log, **popen)
    try:
        wait_until_up(url, proc, limit_s, log)
        yield proc
    finally:
        stop_process_group(proc, grace_s)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """Stop a process started in a session of its own and its children: SIGTERM to its group,
    then SIGKILL after ``grace_s``. Signals the group even when its leader has already exited."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _alive(proc: subprocess.Popen, log: Path | None) -> None:
    """RuntimeError (with the log's tail) if ``proc`` has exited."""
    if proc.poll() is not None:
        raise RuntimeError(f"{_name(proc)} exited with status {proc.returncode}{_tail(log)}")


def _name(proc: subprocess.Popen) -> str:
    return " ".join(map(str, proc.args[:3]))


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not Path(log).is_file():
        return ""
    return ":\n" + Path(log).read_text(errors="replace")[-chars:]
