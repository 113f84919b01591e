"""The ```bash blocks of a docs page that a marker comment puts under test, and a runner that
types them into one bash as a user would (docs/paper-run.md, docs/long-runs.md)."""

from __future__ import annotations

import re
from pathlib import Path

from test_pipeline_e2e import sh

RUNNABLE, DOWNLOAD = "<!-- runnable -->", "<!-- download -->"


def marked_blocks(page: Path, heading: str | None = None) -> list[tuple[str, list[str]]]:
    """(mark, commands) of every marked ```bash block of ``page`` (under ``## heading`` only, if
    given), in order; continuation lines joined, comments and blank lines dropped."""
    text = page.read_text()
    if heading is not None:
        text = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for mark, body in re.findall(rf"({re.escape(RUNNABLE)}|{re.escape(DOWNLOAD)})\n```bash\n(.*?)\n```", text, re.S):
        commands, current = [], ""
        for line in body.splitlines():
            current += line[:-1].rstrip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                command = re.sub(r"\s+#[^\"']*$", "", current).strip()
                if command and not command.startswith("#"):
                    commands.append(command)
                current = ""
        found.append((mark, commands))
    return found


def run_block(cwd: Path, commands: list[str]) -> dict[str, str]:
    """``commands`` in one bash (the venv's programs first on PATH), stopping at the first that
    fails; the output of each command."""
    marks = [f"@@@ {i}" for i in range(len(commands))]
    script = "set -e\nexec 2>&1\n" + "".join(f"echo '{m}'\n{c}\n" for m, c in zip(marks, commands))
    out = sh(cwd, "bash", "-c", script)
    parts = re.split(r"^@@@ \d+$\n?", out, flags=re.M)[1:]
    assert len(parts) == len(commands), out[-3000:]
    return dict(zip(commands, parts))
