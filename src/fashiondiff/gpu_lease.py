"""GPUs of one machine shared out among runs started independently: each run leases its own.

Usage::

    with leased(["0", "1", "2", "3"], count=2, lock_dir=default_lock_dir()) as ids:
        subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)})

A GPU is leased by holding an exclusive ``flock`` on ``<lock_dir>/gpu-<id>.lock``. The kernel
drops the lock when the holder's file is closed or its process ends in any way (kill -9
included), so a crashed run never keeps a GPU. A run picks its GPUs while holding
``choose.lock``: without it, two runs that need two GPUs each could take one of the last two
each, give them back, and do it again. A run that finds too few free waits, polling, until
enough are given back. The lock files must be on a disk local to the machine (``flock`` over
NFS is not dependable), which the default, under the temporary folder, is. Used by ``fashiondiff
sweep-one --gpus``; no stage imports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from fashiondiff.errors import PipelineError

POLL_S = 2.0  # how often a waiting run looks again: GPUs are held for hours, not milliseconds


def default_lock_dir() -> Path:
    """One folder per user under the temporary folder (another user's lock files may not be
    writable: give every user's runs the same ``lock_dir`` to share GPUs across users)."""
    return Path(tempfile.gettempdir()) / f"fashiondiff-gpus-{os.getuid()}"


def parse_ids(text: str) -> list[str]:
    """``"0,1,2,3"`` -> ``["0", "1", "2", "3"]``; an empty or repeated id is an error."""
    ids = [part.strip() for part in text.split(",")]
    if not all(ids) or len(set(ids)) != len(ids):
        raise PipelineError(f"--gpus {text}: expected distinct GPU ids separated by commas, e.g. 0,1,2,3")
    return ids


@contextlib.contextmanager
def leased(
    ids: Sequence[str], count: int, lock_dir: Path, poll_s: float = POLL_S, say: Callable[[str], None] = print
) -> Iterator[list[str]]:
    """``count`` of the GPU ``ids``, held by this process for the block (waiting until that many
    are free); given back on leaving it."""
    if not 1 <= count <= len(ids):
        raise PipelineError(f"--per-run {count}: must be between 1 and the {len(ids)} GPUs of --gpus")
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = _take(ids, count, lock_dir)
    if not held:
        say(f"waiting for {count} of GPUs {','.join(ids)}: other runs hold them")
        while not (held := _take(ids, count, lock_dir)):
            time.sleep(poll_s)
    try:
        yield [gpu for gpu, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)  # closing the file drops its lock


def _take(ids: Sequence[str], count: int, lock_dir: Path) -> list[tuple[str, int]]:
    """``count`` free GPUs as (id, locked file), or none (every lock taken here given back)."""
    with _flocked(lock_dir / "choose.lock"):
        held = []
        for gpu in ids:
            fd = os.open(lock_dir / f"gpu-{gpu}.lock", os.O_RDWR | os.O_CREAT, 0o666)  # not inherited
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((gpu, fd))
            if len(held) == count:
                return held
        for _, fd in held:
            os.close(fd)
        return []


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
