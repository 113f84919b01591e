"""fashiondiff.processes, the toolbox the tests, tools and commands start processes with: a real
HTTP server with a child of its own, stopped with it; an address read from a server's output;
the environment of a copied project."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fashiondiff.processes import SRC, free_port, printed_word, project_env, running, start_group, stop_process_group

# A server that starts a child (as `mlflow ui` starts its workers) and prints its address.
SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    port = int(sys.argv[1])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"child-pid={child.pid}", flush=True)
    server = http.server.HTTPServer(("127.0.0.1", port), http.server.SimpleHTTPRequestHandler)
    print(f"serving on http://127.0.0.1:{port}/#/runs", flush=True)
    server.serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited: only its parent has not reaped it
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_server_is_up_inside_and_stopped_with_its_children_after(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with running(
        [sys.executable, "-c", SERVER, str(port)],
        f"http://127.0.0.1:{port}/",
        limit_s=30,
        log=log,
        cwd=tmp_path,
        env=project_env(),
    ) as proc:
        assert printed_word(log, "/#/", proc, limit_s=10) == f"http://127.0.0.1:{port}/#/runs"
        child = int(printed_word(log, "child-pid=", proc, limit_s=10).split("=")[1])
        assert alive(child)
    assert proc.poll() is not None
    deadline = time.monotonic() + 10  # the child is re-parented when its parent dies: reaped soon after
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_a_server_that_exits_is_an_error_with_its_output(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*port taken"):
        with running(
            [sys.executable, "-c", "print('port taken'); raise SystemExit(3)"],
            f"http://127.0.0.1:{free_port()}/",
            limit_s=30,
            log=log,
        ):
            pass
    proc = start_group([sys.executable, "-c", "print('no address here')"], log)
    try:
        with pytest.raises(RuntimeError, match="exited with status 0"):
            printed_word(log, "http://", proc, limit_s=30)
    finally:
        stop_process_group(proc)


def test_project_env_names_the_package_to_import_and_leaves_any_dvc_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train_prior")  # as if pytest ran inside a stage
    env = project_env()
    assert env["PYTHONPATH"] == str(SRC) and not any(key.startswith("DVC_") for key in env)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # dvc, and the stages' `python`
    copy = project_env(src=tmp_path / "src", FASHIONDIFF_TRACKING="off")
    assert copy["PYTHONPATH"] == str(tmp_path / "src") and copy["FASHIONDIFF_TRACKING"] == "off"
