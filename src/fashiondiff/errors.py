"""User-facing errors: one line on stderr, a non-zero exit, no traceback.

Library code raises :class:`PipelineError` with a message that names the file, key
or row at fault; entry points wrap ``main`` in :func:`cli` so the user sees
``error: <message>`` and the process exits with status 1.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    ``exit_code`` (1 unless a subclass says otherwise, e.g. 143 after SIGTERM) is the status
    the process ends with."""

    exit_code = 1


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

