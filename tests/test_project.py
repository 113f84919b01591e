"""fashiondiff.project: paths under the project's root (DVC_ROOT), and checkpoint folders that
two experiments running at once never share, in real processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fashiondiff.project import FINISHED, checkpoint_home, project_path, project_root

SRC = Path(__file__).resolve().parents[1] / "src"

# One "training": hold the run's checkpoint folder for HOLD seconds, print when it got it.
HOLDER = """
import sys, time
from fashiondiff.project import checkpoint_home
root, fingerprint, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
with checkpoint_home(root, fingerprint) as folder:
    print(f"got {folder.name} {time.time():.3f}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    time.sleep(hold)
"""


def test_relative_paths_resolve_against_dvc_root(tmp_path, monkeypatch):
    """A queued experiment's stage runs in .dvc/tmp/exps/tmpXXXX; DVC_ROOT is the repository."""
    work = tmp_path / ".dvc/tmp/exps/tmpabcd"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert project_root() == work and project_path("checkpoints/prior") == work / "checkpoints/prior"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert project_path("checkpoints/prior") == tmp_path / "checkpoints/prior"
    assert project_path("/abs/x") == Path("/abs/x")


def _hold(root: Path, fingerprint: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), fingerprint, str(seconds)],
        env={"PYTHONPATH": str(SRC), "PATH": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_same_run_twice_at_once_takes_turns_other_runs_do_not_wait(tmp_path):
    first = _hold(tmp_path, "a" * 64, 3)
    assert first.stdout.readline().startswith("got aaaa")  # holds the folder from here on
    started = time.time()
    same, other = _hold(tmp_path, "a" * 64, 0), _hold(tmp_path, "b" * 64, 0)
    other_out, _ = other.communicate(timeout=60)
    same_out, same_err = same.communicate(timeout=60)
    first.wait(timeout=60)
    assert float(other_out.split()[2]) - started < 2.5  # another run's folder: no wait
    assert float(same_out.split()[2]) - started > 2  # the same run's: after the first left it
    assert "another run with the same params and data is training here; waiting" in same_err


def test_a_finished_run_prunes_other_finished_runs_but_not_unfinished_or_held_ones(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("old", "unfinished", "held"):  # earlier runs' folders
        (root / (name * 8)[:16]).mkdir(parents=True)
        if name != "unfinished":  # killed before its end
            (root / (name * 8)[:16] / FINISHED).touch()
    holder = _hold(root, "held" * 8, 30)  # a run with those params, training now
    assert holder.stdout.readline().startswith("got")
    try:
        with checkpoint_home(root, "new" * 8) as folder:
            folder.mkdir(parents=True)
    finally:
        holder.kill()
        holder.wait()
    left = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert left == sorted(n[:16] for n in ("held" * 8, "new" * 8, "unfinished" * 8)), left
    assert (root / ("new" * 8)[:16] / FINISHED).is_file()
