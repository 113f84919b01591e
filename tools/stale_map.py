"""Which DVC stages each source file makes stale: the map DVC draws from dvc.yaml's declared deps.

Usage: python tools/stale_map.py            # print the map (Markdown)
       python tools/stale_map.py --write    # write docs/stale-map.md
       python tools/stale_map.py --check    # exit 1 if docs/stale-map.md is not what --write writes

DVC hashes whole files: editing a file reruns every stage that lists it (or a folder holding it)
in its ``deps``. Each stage lists exactly the modules it imports (tests/test_pipeline_e2e.py
checks that against what the stage process imported), so this map is also the import map of
the stages. Foreach stages (``extract@train``, ...) appear once, by their name before ``@``.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC_FILES = ("dvc.yaml", "standin/dvc.yaml")
SOURCES = ("src", "stages", "tools", "tests", "bench")
MAPPED = ("src", "stages")  # what the written map lists; the rest is checked to stale nothing
OUT = Path("docs/stale-map.md")


def stage_deps(root: Path = ROOT) -> dict[str, list[str]]:
    """Stage name -> its declared deps (repository-relative; ``${...}`` data and model paths left out)."""
    found: dict[str, list[str]] = {}
    for name in DVC_FILES:
        stages = yaml.safe_load((root / name).read_text())["stages"]
        for stage, body in stages.items():
            body = body.get("do", body)
            found[stage] = [d for d in body.get("deps", []) if "${" not in d]
    return found


def _paths(root: Path, kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """Stage name -> the paths it declares under ``kinds``, a ``${...}`` inside a path read as
    any one segment; a path that is only a ``${...}`` (a data or model path params choose) left out."""
    found: dict[str, list[str]] = {}
    for name in DVC_FILES:
        for stage, body in yaml.safe_load((root / name).read_text())["stages"].items():
            body = body.get("do", body)
            paths = [
                p
                for kind in kinds
                for entry in body.get(kind, []) or []
                for p in ([entry] if isinstance(entry, str) else entry)
            ]
            found[stage] = [re.sub(r"\$\{[^}]*\}", "*", p) for p in paths if not p.startswith("${")]
    return found


def after(stages, root: Path = ROOT) -> set[str]:
    """The stages that read, directly or not, an output of ``stages``: what reruns next when
    ``stages`` rerun and their outputs change. Through the paths dvc.yaml writes out; not
    through the ones params choose (``${model.prior}``: the stand-in's outputs by default)."""
    deps, outs = _paths(root, ("deps",)), _paths(root, ("outs", "metrics"))
    found, todo = set(), list(stages)
    while todo:
        stage = todo.pop()
        for other, ds in deps.items():
            if other not in found and any(_overlap(o, d) for o in outs[stage] for d in ds):
                found.add(other)
                todo.append(other)
    return found - set(stages)


def _overlap(out: str, dep: str) -> bool:
    """The same path, or one a folder holding the other (``*``: any one segment)."""
    a, b = out.rstrip("/").split("/"), dep.rstrip("/").split("/")
    return all(fnmatch.fnmatchcase(x, y) or fnmatch.fnmatchcase(y, x) for x, y in zip(a, b))


def stale_map(root: Path = ROOT, tops=SOURCES) -> dict[str, list[str]]:
    """Every Python file under ``tops`` -> the stages whose deps hold it (in dvc.yaml order)."""
    deps = stage_deps(root)
    files = sorted(
        str(p.relative_to(root)) for top in tops for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts
    )
    return {
        f: [s for s, ds in deps.items() if any(f == d or f.startswith(d.rstrip("/") + "/") for d in ds)] for f in files
    }


def render(mapping: dict[str, list[str]]) -> str:
    lines = [
        "# Which stages an edit makes stale",
        "",
        "Written by `python tools/stale_map.py --write` from the `deps` of `dvc.yaml` and",
        "`standin/dvc.yaml` (a test checks it is current). DVC reruns a stage when a file it lists",
        "changes; a file listed nowhere (commands, the web page, the MLflow UI view) reruns nothing,",
        "and no file under `tools/`, `tests/` or `bench/` is any stage's dependency (tests/test_stale_map.py",
        "checks both). `register` runs at every `dvc repro` anyway (`always_changed`).",
        "",
        "Params are cut the same way: each stage validates only the sections it declares, with",
        "their own modules under `src/fashiondiff/config/` (`train.py`: `train`, `prior`, `decoder`;",
        "`data.py`, `embed.py`, ...), and lists only those; `schema.py` (the shared types) and `view.py`",
        "are every stage's. So a new training option, in `config/train.py`, makes the two trainings",
        "stale (and, through their outputs, `evaluate` and `register`), never `extract`, `embed` or",
        "the stand-in's stages; `config/whole.py`, the whole file's check, is no stage's.",
        "",
        "| file | stages it makes stale |",
        "| --- | --- |",
    ]
    lines += [f"| `{f}` | {', '.join(f'`{s}`' for s in stages) or '-'} |" for f, stages in mapping.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {OUT}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {OUT} is out of date")
    args = parser.parse_args(argv)
    text = render(stale_map(tops=MAPPED))
    if args.write:
        (ROOT / OUT).write_text(text)
    elif args.check:
        if not (ROOT / OUT).is_file() or (ROOT / OUT).read_text() != text:
            print(f"{OUT} is out of date: run python tools/stale_map.py --write", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
