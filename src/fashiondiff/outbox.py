"""MLflow calls delivered by a background thread, so a tracking server that goes away never
stops a stage: training, checkpoints and DVC outputs wait on it for a bounded time at most.

:class:`fashiondiff.tracking.Tracker` turns each call made after the stage's runs exist
(metrics, params, artifacts, images, the runs' end) into an *op*, a JSON-able dict, and
puts it here. One thread per stage process sends the ops in order, merging consecutive
metric ops of a run into one ``log_batch``. A failed send (server down, hung, restarting:
MLflow's INTERNAL_ERROR and the like) is retried every ``FASHIONDIFF_TRACKING_RETRY_S`` seconds (5), the op kept;
an op the store refuses for good (a bad value, a deleted run) is dropped with one line.

At the stage's end :meth:`Outbox.close` waits up to ``FASHIONDIFF_TRACKING_FLUSH_S``
seconds (60) for the rest, then *spools* what is left (artifact files copied) to
``<project root>/.fashiondiff/outbox/<store>/`` and returns: the next stage process that
reaches the same store delivers it first (``Outbox(..., adopt=True)``). Delivery is
at-least-once: MLflow keeps one copy of a metric point logged twice, a param logged twice
with the same value and an artifact uploaded twice.

Measured with MLflow 3.17 and its defaults (7 retries, backoff factor 2, 120 s timeout), one
``log_batch`` to a stopped server blocked 245 s before failing, and ``log_batch(synchronous=False)``
drops a batch after those retries. :func:`fast_failing_requests` makes each HTTP request
fail at once (refused) or after ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (hung); the pacing is ours.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fashiondiff.errors import first_line
from fashiondiff.io import atomic_dir

# Seconds, each overridable by its environment variable (read when used).
RETRY_S = ("FASHIONDIFF_TRACKING_RETRY_S", 5.0)  # between two attempts at an op
FLUSH_S = ("FASHIONDIFF_TRACKING_FLUSH_S", 60.0)  # a stage's end waits at most this for delivery
SPOOL_DIR = ".fashiondiff/outbox"  # under the project's root (fashiondiff.project)
# MLflow's server errors that say "try again" (a refused or timed-out request is INTERNAL_ERROR
# too); any other error code is the store refusing the op itself.
TRANSIENT = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "SERVICE_UNDER_MAINTENANCE",
    "ABORTED",
}
_MERGE_LIMIT = 1000  # metrics per log_batch (MLflow's own limit per request)


def seconds(setting: tuple[str, float]) -> float:
    name, default = setting
    return float(os.environ.get(name) or default)


def fast_failing_requests(uri: str) -> None:
    """For an ``http(s)://`` store, one attempt per request and a short timeout (unless set):
    the outbox retries at its own pace, and a stage's start gives up after a bounded time."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the store did not answer, or answered "later" (a locked SQLite file)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy")


def send(client, op: dict) -> None:
    """Deliver one op (metrics ops may hold many points) through ``client``."""
    from mlflow.entities import Metric, Param

    kind, run = op["op"], op["run"]
    if kind == "metrics":
        client.log_batch(run, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in op["points"]])
    elif kind == "params":
        client.log_batch(run, params=[Param(k, v) for k, v in op["params"].items()])
    elif kind == "artifact":
        path = Path(op["path"])
        if not path.exists():  # a file gone is gone: retrying would never end
            raise FileNotFoundError(f"{path}: no such file to log")
        if path.is_dir():
            client.log_artifacts(run, str(path), artifact_path=op["artifact_path"])
        else:
            client.log_artifact(run, str(path), artifact_path=op["artifact_path"])
    elif kind == "image":
        from PIL import Image

        with Image.open(op["path"]) as image:
            image.load()
            if op.get("key"):  # MLflow's own async logging would retry on its schedule, then drop it
                client.log_image(
                    run, image, key=op["key"], step=op.get("step"), timestamp=op.get("timestamp"), synchronous=True
                )
            else:
                client.log_image(run, image, artifact_file=op["artifact_file"], synchronous=True)
    elif kind == "end":
        client.set_terminated(run, status=op["status"], end_time=op["end_time"])
    else:
        raise ValueError(f"unknown tracking op {kind!r}")


class Outbox:
    """Ops for one store, sent in order by a daemon thread; see the module docstring."""

    def __init__(self, client, uri: str, root: Path, label: str = "", adopt: bool = True) -> None:
        """``root``: the project's root (its spool folder); ``label``: the store, for messages;
        ``adopt``: first queue what earlier processes spooled for this store."""
        self.client, self.uri, self.label = client, uri, label or uri
        self.spool_home = root / SPOOL_DIR / hashlib.sha256(uri.encode()).hexdigest()[:16]
        self._pending: collections.deque[dict] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._stop = threading.Event()  # close(): ends a wait between attempts at once
        self._down_since: float | None = None
        self._staging: Path | None = None  # images rendered to PNG, until sent
        self._adopted: list[tuple[Path, object]] = []  # (spool folder, its held lock file)
        self.adopted = self._adopt_spools() if adopt else 0
        self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
        self._thread.start()

    # -- the stage's side ------------------------------------------------------------------

    def put(self, op: dict) -> None:
        with self._wake:
            self._pending.append(op)
            self._wake.notify()

    def stage_image(self, image, name: str) -> str:
        """Save ``image`` as a PNG the outbox owns (the caller may change or drop the image)."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="fashiondiff-outbox-"))
        folder = Path(tempfile.mkdtemp(dir=self._staging))
        path = folder / (Path(name).name or "image.png")
        image.save(path, format="PNG")
        return str(path)

    def flush(self, timeout: float) -> bool:
        """Wait until every op is delivered, at most ``timeout`` seconds; True if they were."""
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.5))
        return True

    def close(self, timeout: float | None = None) -> Path | None:
        """Flush for at most ``timeout`` seconds (default FLUSH_S), spool the rest; returns the
        spool folder, if any."""
        delivered = self.flush(seconds(FLUSH_S) if timeout is None else timeout)
        with self._wake:
            self._closing = True
            left = list(self._pending)
            self._pending.clear()
            self._wake.notify_all()
            self._stop.set()
        left = [op for op in left if op["op"] != "spool_done"]
        spool = None if delivered or not left else self._spool(left)
        with self._wake:
            for folder, lock in self._adopted:  # what is left of them is in the new spool now
                shutil.rmtree(folder, ignore_errors=True)
                lock.close()
            self._adopted.clear()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
        return spool

    # -- spooling -------------------------------------------------------------------------

    def _spool(self, ops: list[dict]) -> Path:
        """Write ``ops`` (their files copied) to a new spool folder, atomically."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        target = self.spool_home / name
        with atomic_dir(target) as tmp:
            lines = []
            for i, op in enumerate(ops):
                op = dict(op)
                if op["op"] in ("artifact", "image") and Path(op["path"]).exists():
                    source = Path(op["path"])
                    copy = tmp / "files" / str(i) / source.name
                    copy.parent.mkdir(parents=True)
                    (shutil.copytree if source.is_dir() else shutil.copyfile)(source, copy)
                    op["path"] = str(target / copy.relative_to(tmp))
                lines.append(json.dumps(op))
            (tmp / "ops.jsonl").write_text("\n".join(lines) + "\n")
            (tmp / "store.txt").write_text(self.label + "\n")
        return target

    def _adopt_spools(self) -> int:
        """Queue the ops other stage processes spooled for this store (oldest first), before the
        thread starts; returns how many. A folder another live process delivers is skipped."""
        if not self.spool_home.is_dir():
            return 0
        found = []
        for folder in sorted(p for p in self.spool_home.iterdir() if p.is_dir() and not p.name.startswith(".")):
            lock = open(folder / ".lock", "a")  # noqa: SIM115 - held until delivered or closed
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            ops_file = folder / "ops.jsonl"
            if not ops_file.is_file():  # delivered and deleted meanwhile
                lock.close()
                continue
            ops = [json.loads(line) for line in ops_file.read_text().splitlines() if line]
            self._adopted.append((folder, lock))
            found.extend(ops + [{"op": "spool_done", "run": "", "folder": str(folder)}])
        self._pending.extend(found)
        return sum(1 for op in found if op["op"] != "spool_done")

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if self._closing:
                    return
                head = self._take()
            try:
                if head["op"] == "spool_done":
                    self._release(Path(head["folder"]))
                else:
                    send(self.client, head)
            except Exception as exc:  # noqa: BLE001 - decided below: retry, or drop with a line
                if is_transient(exc):
                    self._outage(exc)
                    self._stop.wait(seconds(RETRY_S))  # a fixed pace, whatever the stage puts meanwhile
                    continue
                print(
                    f"mlflow: dropped a {head['op']} call the store refused: {_reason(exc)}",
                    file=sys.stderr,
                    flush=True,
                )
            self._done(head)

    def _take(self) -> dict:
        """The next op; consecutive metric ops of one run merged into one (left queued until sent)."""
        head = self._pending[0]
        if head["op"] != "metrics":
            return head
        points, count = list(head["points"]), 1
        for op in list(self._pending)[1:]:
            if op["op"] != "metrics" or op["run"] != head["run"] or len(points) + len(op["points"]) > _MERGE_LIMIT:
                break
            points.extend(op["points"])
            count += 1
        return {**head, "points": points, "merged": count}

    def _done(self, sent: dict) -> None:
        with self._wake:
            for _ in range(sent.get("merged", 1)):
                if self._pending:
                    self._pending.popleft()
            self._wake.notify_all()
        if self._down_since is not None:
            print(
                f"mlflow: {self.label} answers again after {time.monotonic() - self._down_since:.0f} s; "
                f"sending what was queued",
                file=sys.stderr,
                flush=True,
            )
            self._down_since = None

    def _outage(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            print(
                f"mlflow: {self.label} does not answer ({_reason(exc)}); the stage goes on, "
                f"its tracking calls are kept and retried every {seconds(RETRY_S):g} s",
                file=sys.stderr,
                flush=True,
            )

    def _release(self, folder: Path) -> None:
        """An adopted spool folder, all of it delivered: deleted."""
        with self._wake:
            for i, (adopted, lock) in enumerate(self._adopted):
                if adopted == folder:
                    shutil.rmtree(folder, ignore_errors=True)
                    lock.close()
                    del self._adopted[i]
                    return


def _reason(exc: BaseException) -> str:
    """What went wrong, shorter than its first line: MLflow wraps a refused connection in three
    lines of urllib3, whose errno or timeout is the news."""
    text = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip()
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip()
    if "timed out" in text or "Timeout" in text:
        return "timed out"
    return first_line(exc)[:200]


@contextlib.contextmanager
def store_lock(uri: str):
    """For a ``sqlite:///`` store, an exclusive lock on its folder while a stage opens its runs:
    two processes creating a fresh database at once race on MLflow's schema migration (one
    fails with "duplicate column name"). Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    folder = Path(uri[len("sqlite:///") :]).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
