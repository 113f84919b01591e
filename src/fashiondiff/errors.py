"""User-facing errors: one line on stderr, a non-zero exit, no traceback.

Library code raises :class:`PipelineError` with a message that names the file, key
or row at fault; entry points wrap ``main`` in :func:`cli` so the user sees
``error: <message>`` and the process exits with status 1.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    ``exit_code`` (1 unless a subclass says otherwise, e.g. 143 after SIGTERM) is the status
    the process ends with."""

    exit_code = 1


class Stopped(PipelineError):
    """SIGTERM or SIGINT (Slurm, Kubernetes, spot instances, Ctrl-C) stopped the stage; what it
    finished is kept and the message says where. The exit status follows the shell's convention,
    128 + the signal: 143 for SIGTERM, 130 for SIGINT. ``step``: the training step it stopped at."""

    def __init__(self, message: str, signum: int, step: int | None = None):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.step = step


def first_line(exc: BaseException, empty: str = "") -> str:
    """An exception's message in one line, for a one-line error: its first line; ``empty`` (by
    default the exception's type name) when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (empty or type(exc).__name__)


def cli(main: F) -> F:
    """Run ``main``; turn PipelineError (and Ctrl-C) into a one-line message and exit code."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception:
            # Unexpected bugs keep their traceback, unless asked otherwise.
            if os.environ.get("FASHIONDIFF_NO_TRACEBACK"):
                print(f"error: {sys.exc_info()[1]!r}", file=sys.stderr)
                sys.exit(1)
            raise

    return wrapper  # type: ignore[return-value]

