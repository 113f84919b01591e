"""Where what must outlive DVC's temporary copies lives: the project's root, not the stage's cwd.

``dvc exp run --queue`` and ``--temp`` (and ``--dry``) run an experiment in a copy of the
repository under ``.dvc/tmp/exps/``, deleted when it ends; its stages' working directory is
that copy. DVC exports ``DVC_ROOT``, the *original* repository's root, to every stage it
runs (also under plain ``dvc repro``; dvc/repo/experiments/queue/base.py sets it when
queuing), so a relative path that must survive the experiment (the MLflow store, training
checkpoints, the tracking outbox) resolves against it. A stage run by hand resolves against
its cwd.

Usage::

    home = project_path("checkpoints/prior")                  # $DVC_ROOT/checkpoints/prior
    with checkpoint_home("checkpoints/prior", fingerprint) as folder:
        train(..., checkpoint_dir=folder)                     # .../checkpoints/prior/<fingerprint[:16]>
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

FINISHED = "FINISHED"  # marker file in a checkpoint home: its run's outputs were written
# 16 hex digits (64 bits) of the run's SHA-256 fingerprint name its folder: enough that two
# runs' folders never collide, short enough to read in `ls`.
FOLDER_DIGITS = 16


def project_root() -> Path:
    """The repository DVC runs the stage for (``DVC_ROOT``), else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd())


def project_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute against :func:`project_root` (an absolute path stays as it is)."""
    path = Path(path)
    return path if path.is_absolute() else project_root() / path


@contextlib.contextmanager
def checkpoint_home(root: str | os.PathLike, fingerprint: str, rank: int = 0) -> Iterator[Path]:
    """The checkpoint folder of the run ``fingerprint`` names, under ``root`` (resolved with
    :func:`project_path`), held by this process for the block.

    Each run gets a folder of its own, so that two experiments DVC's queue runs at once never
    share one (the loop deletes checkpoints of other params before it starts). Two runs with
    the *same* fingerprint (two queued experiments that differ only downstream) take turns:
    the second waits for the first, then resumes its finished checkpoint instead of training
    again. ``rank``: under ``accelerate launch`` each process holds its own rank's lock.

    On leaving the block normally (rank 0), the folder is marked finished and the folders of
    other finished runs are deleted when no process holds them: like one shared folder, a
    model's checkpoints hold the last finished run (``dvc repro --force`` resumes it at its
    end) and any unfinished run, which the next run with its params resumes.
    """
    base = project_path(root)
    folder = base / fingerprint[:FOLDER_DIGITS]
    with _locked(_lock_file(base, folder.name, rank), wait=True, who=str(folder)):
        yield folder
        if rank == 0 and folder.is_dir():
            (folder / FINISHED).touch()
            _prune(base, keep=folder.name)


def _lock_file(base: Path, name: str, rank: int) -> Path:
    # Beside the folder, not in it: the loop deletes a folder whose checkpoints belong to
    # another step plan, and a lock file deleted while held no longer excludes anyone.
    return base / f".{name}.lock-{rank}"


@contextlib.contextmanager
def _locked(path: Path, wait: bool, who: str = "") -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies); yields
    False without waiting when ``wait`` is False and another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(
                f"{who}: another run with the same params and data is training here; "
                f"waiting for it, then resuming from its checkpoints",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prune(base: Path, keep: str) -> None:
    """Delete the finished runs' folders other than ``keep`` that no process holds."""
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and p.name != keep):
        if not (folder / FINISHED).is_file():
            continue  # unfinished: the next run with its params resumes it
        locks = sorted(base.glob(f".{folder.name}.lock-*")) or [_lock_file(base, folder.name, 0)]
        with contextlib.ExitStack() as stack:
            if all(stack.enter_context(_locked(lock, wait=False)) for lock in locks):
                shutil.rmtree(folder, ignore_errors=True)
