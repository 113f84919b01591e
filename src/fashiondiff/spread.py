"""Where this process stands among the launcher's processes, and the hand-overs of ``embed`` and ``evaluate``.

Usage, in the stage (run by ``python`` or by ``accelerate launch``)::

    with stop_on_signals():                             # SIGTERM/SIGINT raise Stopped
        ranks = Ranks.start("embed", params.compute.timeout_s)
        mine = ranks.shard(todo)                        # this process's contiguous part of a list
        for k in range(ranks.rounds(len(todo))):        # every process takes part in every round
            parts = ranks.gather(result, f"image batches, round {k + 1}")  # process 0: one per process

One process (``compute.launcher: python``): no torch.distributed at all; ``gather`` returns
``[obj]``. Several: accelerate's ``PartialState`` joins the process group the launcher set up
and picks this process's device (``cuda:<local rank>``, or the CPU under ACCELERATE_USE_CPU).
Process 0 writes every output, in the original order, from what the others hand it.

Every hand-over goes through a gloo group (on GPUs too: ``monitored_barrier`` exists on gloo
only, and what is handed over is small: arrays of one batch, PNG bytes, statistics) and starts
with ``monitored_barrier(timeout=compute.timeout_s)``: a process that waits longer stops with
one line saying what it waited for (gloo's own timeout says neither), and process 0's line
names the missing process. Measured (accelerate 1.15, torch 2.14, gloo, two CPU processes):

* plain ``PartialState()`` under ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu`` reports
  one process, index 0, on BOTH processes (the group itself has two): ``cpu=`` must be passed;
* a process that fails (an exception, or kill -9) ends the others in ~0.5 s on an idle machine
  (5-10 s in tests/test_spread.py on a loaded one): the launcher's agent sends them SIGTERM
  (SIGKILL 30 s later). SIGTERM's default action skips ``finally:``
  blocks, hence :func:`stop_on_signals`;
* ``gather_object`` hands numpy arrays over bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

from fashiondiff.errors import PipelineError, Stopped
from fashiondiff.io import DISK_FULL
from fashiondiff.runtime import default_device


class Interrupted(BaseException):
    """What the signal handler raises: a BaseException, like KeyboardInterrupt, so that no library's
    ``except Exception`` swallows it (one did: the stage then ran to its end). The stage's code
    turns it into :class:`Stopped`, saying what is kept."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class HandOverFailed(PipelineError):
    """Another process died during a hand-over, or did not come within ``timeout_s``."""


_received: list[int] = []  # the signals :func:`stop_on_signals` caught in this process, first first


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise :class:`Interrupted` (a :class:`Stopped` when it
    leaves the block), so that work in progress is left resumable and the stage ends with one
    line (Slurm, Kubernetes, spot instances and the launcher's agent stop a job with SIGTERM).
    Past the block (the error being printed, the
    interpreter exiting) the previous handlers are back: a late SIGTERM ends the process, not
    an atexit handler with a traceback. A forked child (a DataLoader worker) inherits the
    handler and keeps the defaults: SIGINT is KeyboardInterrupt there, SIGTERM ends it.

    The exception can be lost: Python prints ("Exception ignored in"), and then drops, one raised
    in a callback it runs itself (seen in tests/test_launch.py: in ``os.fork``'s after-fork hooks,
    while a DataLoader started its workers; the stage then ran to its end). So the signal is also
    recorded, every hand-over first calls :func:`raise_if_stopped` (a lost one stops the stage
    there, at its next batch), and inside the block such a drop prints nothing.

    A DataLoader's processes share the stage process's group, so a signal sent to the group
    (torch elastic's agent: ``killpg``) ends them too, and torch's SIGCHLD handler raises their
    death ("DataLoader worker ... is killed by signal") wherever this process is next: seen in
    tests/test_launch.py, in the middle of the stop, a traceback instead of the line. Once a
    stop is asked, SIGCHLD does nothing for the rest of the process, which is ending."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _received.append(signum)
        _quiet_loader_deaths()
        raise Interrupted(signum)

    def unraisable(info):
        if not isinstance(info.exc_value, Interrupted):
            previous_hook(info)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    except Interrupted as exc:  # not inside the stage's resumable work: nothing to add
        raise Stopped(str(exc), exc.signum) from None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        sys.unraisablehook = previous_hook
        _received.clear()


def _quiet_loader_deaths() -> None:
    """A handler that does nothing for SIGCHLD, if a Python one (torch's, for DataLoader processes)
    holds it. Not the default: a SIGCHLD already received would be written out as "ignored due
    to race condition" when Python comes to run its handler."""
    if hasattr(signal, "SIGCHLD") and callable(signal.getsignal(signal.SIGCHLD)):
        signal.signal(signal.SIGCHLD, _nothing)


def _nothing(signum, frame) -> None:
    pass


def raise_if_stopped() -> None:
    """:class:`Interrupted` if :func:`stop_on_signals` caught a signal: its own exception may have
    been dropped, and no work is to start once a stop was asked."""
    if _received:
        raise Interrupted(_received[0])


def batch_runs(batches) -> list[list[int]]:
    """Finished batch numbers as sorted ``[first, last + 1]`` runs: a progress file stays small."""
    runs: list[list[int]] = []
    for b in sorted(batches):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return runs


def batches_in(runs) -> set[int]:
    return {b for lo, hi in runs for b in range(lo, hi)}


def with_kept(stage: str, exc: BaseException, kept: str) -> PipelineError:
    """``exc`` (Interrupted, HandOverFailed) as the stage's one line, ending with what is kept."""
    text = str(exc) if str(exc).startswith(f"{stage}:") else f"{stage}: {exc}"
    if isinstance(exc, Interrupted):
        return Stopped(f"{text}; {kept}", exc.signum)
    return HandOverFailed(f"{text}; {kept}")


@contextlib.contextmanager
def disk_full_is_an_error(path, kept: Callable[[], str]) -> Iterator[None]:
    """Writing ``path`` inside the block (not through ``fashiondiff.io``, which says it itself): a
    full disk, a quota or a file-size limit (``ulimit -f``: Python ignores SIGXFSZ, the write
    fails with EFBIG) becomes one line naming it and saying what is kept (``kept()``, asked
    only then); any other OSError propagates."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise PipelineError(f"{path}: cannot write, {os.strerror(exc.errno).lower()}; {kept()}") from None


def _foreign(exc: BaseException) -> bool:
    """An exception a signal handler raised while this process waited, not the wait's own: torch
    raises a DataLoader worker's death from its SIGCHLD handler, wherever the process is."""
    return "DataLoader worker" in str(exc)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@dataclass
class Ranks:
    """This process's index among ``count`` processes, its device, and the hand-overs."""

    stage: str
    timeout_s: float
    index: int = 0
    count: int = 1
    device: str = "cpu"
    group: object = None  # the gloo group of the hand-overs (None: the default group, or one process)

    @classmethod
    def start(cls, stage: str, timeout_s: float) -> Ranks:
        """One process unless the launcher started several (WORLD_SIZE > 1)."""
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return cls(stage, timeout_s, device=default_device())
        import torch.distributed as dist
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        timeout = timedelta(seconds=timeout_s)
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timeout)
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
        return cls(stage, timeout_s, state.process_index, state.num_processes, str(state.device), group)

    @property
    def main(self) -> bool:
        return self.index == 0

    def shard(self, items: Sequence) -> list:
        """This process's contiguous part of ``items``; the first ``len % count`` take one more."""
        per, extra = divmod(len(items), self.count)
        start = self.index * per + min(self.index, extra)
        return list(items[start : start + per + (self.index < extra)])

    def rounds(self, n: int) -> int:
        """Hand-over rounds for ``n`` items shared out by :meth:`shard`: the longest part."""
        return -(-n // self.count)

    def gather(self, obj, what: str) -> list | None:
        """Process 0: every process's ``obj`` in process order; the others: None."""
        raise_if_stopped()
        if self.count == 1:
            return [obj]
        import torch.distributed as dist

        self._meet(what)
        out = [None] * self.count if self.main else None
        try:
            dist.gather_object(obj, out, dst=0, group=self.group)
        except RuntimeError as exc:  # a process died during the hand-over itself
            if _foreign(exc):
                raise
            raise HandOverFailed(
                f"{self.stage}: process {self.index} of {self.count} lost another process "
                f"while handing over {what} ({_first_line(exc)})"
            ) from None
        return out

    def broadcast(self, obj, what: str):
        """Process 0's ``obj``, on every process."""
        raise_if_stopped()
        if self.count == 1:
            return obj
        import torch.distributed as dist

        self._meet(what)
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as exc:
            if _foreign(exc):
                raise
            raise HandOverFailed(
                f"{self.stage}: process {self.index} of {self.count} lost another process "
                f"while receiving {what} ({_first_line(exc)})"
            ) from None
        return box[0]

    def _meet(self, what: str) -> None:
        """Every process here within ``timeout_s``, or a line saying what was waited for."""
        import torch.distributed as dist

        started = time.monotonic()
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        except RuntimeError as exc:
            if _foreign(exc):
                raise
            waited = time.monotonic() - started
            if waited < 0.9 * self.timeout_s:  # gloo words a vanished process as a timeout too
                raise HandOverFailed(
                    f"{self.stage}: process {self.index} of {self.count} lost another process "
                    f"at the hand-over of {what} ({_first_line(exc)})"
                ) from None
            raise HandOverFailed(
                f"{self.stage}: process {self.index} of {self.count} waited {waited:.0f} s (compute.timeout_s "
                f"{self.timeout_s:g}) at the hand-over of {what}: {_first_line(exc)}"
            ) from None

    def close(self) -> None:
        """Leave the process group (after the last hand-over)."""
        if self.count > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
