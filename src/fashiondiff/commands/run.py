"""Run a preset: a named set of params (``presets/NAME.yaml``) as one DVC experiment.

Usage::

    fashiondiff run paper --dry      # DVC's stages, then steps, hours and disk: nothing runs
    fashiondiff run paper            # dvc exp run -n paper -S <each of the preset's params>
    fashiondiff run paper --queue    # the same, queued (then: dvc queue start)
    fashiondiff run presets/my.yaml -S lr=0.0001 -n my-lr

A preset file holds ``name`` (the experiment's, ``-n``) and ``params``: dotted params.yaml
keys and their values, each passed to ``dvc exp run`` as ``-S key=value`` (DVC writes them
into params.yaml and records them with the experiment, as for a hand-typed ``-S``). A value
of null removes the key from params.yaml instead (``-S`` cannot remove one): the one
optional key, ``data.files.generic``. The params are validated before DVC starts, and the
run is refused, in one line, when the plan's disk total exceeds the free space.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
from pathlib import Path

import yaml

from fashiondiff.config.whole import params_from_dict
from fashiondiff.errors import PipelineError
from fashiondiff.plan import make_plan

PRESETS = Path("presets")


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "run", help="run a preset (presets/NAME.yaml) as one DVC experiment", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("preset", help="a preset's name (presets/NAME.yaml) or a YAML file")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--dry",
        action="store_true",
        help="list the stages DVC would run, then the planned steps, hours and disk; run nothing",
    )
    how.add_argument("--queue", action="store_true", help="queue the experiment (dvc exp run --queue)")
    parser.add_argument("-n", "--name", help="the experiment's name (default: the preset's)")
    parser.add_argument(
        "-S",
        "--set-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more param, after the preset's (as dvc exp run -S)",
    )
    parser.set_defaults(func=run)


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESETS / f"{preset}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml"))) or "none"
        raise PipelineError(f"{path}: no such preset (presets: {known})")
    return path


def read_preset(path: Path, extra: list[str]) -> tuple[str, dict[str, object]]:
    """The preset's name and its params, the ``-S`` extras applied after them."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("params"), dict):
        raise PipelineError(f"{path}: a preset is a mapping with `params:` (dotted params.yaml keys)")
    settings = dict(raw["params"])
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise PipelineError(f"-S {item}: expected KEY=VALUE")
        settings[key.strip()] = yaml.safe_load(value)
    return str(raw.get("name") or path.stem), settings


def applied(tree: dict, settings: dict[str, object], source: Path) -> dict:
    """A copy of the params tree with ``settings`` set (None: removed); unknown keys refused."""
    out = yaml.safe_load(yaml.safe_dump(tree))
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise PipelineError(f"{source}: params key {key}: params.yaml has no section {part}")
        if value is None:
            node.pop(leaf, None)
        elif leaf not in node and not (key == "data.files.generic"):
            raise PipelineError(f"{source}: params key {key}: not in params.yaml")
        else:
            node[leaf] = value
    return out


def as_flag(key: str, value: object) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(text, str) and text.endswith("\n..."):
        text = text[: -len("\n...")]
    return f"{key}={text}"


def remove_keys(params_file: Path, keys: list[str]) -> None:
    """Remove dotted keys from params.yaml, its comments kept (ruamel, as DVC writes it)."""
    from ruamel.yaml import YAML

    loader = YAML()
    loader.preserve_quotes = True
    data = loader.load(params_file.read_text(encoding="utf-8"))
    for key in keys:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    with params_file.open("w", encoding="utf-8") as handle:
        loader.dump(data, handle)


def run(args: argparse.Namespace) -> None:
    path = preset_path(args.preset)
    name, settings = read_preset(path, args.set_param)
    name = args.name or name
    params_file = Path("params.yaml")
    tree = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    params = params_from_dict(applied(tree, settings, path))
    plan = make_plan(params)
    removals = [k for k, v in settings.items() if v is None and _has(tree, k)]
    flags = [f for k, v in settings.items() if v is not None for f in ("-S", as_flag(k, v))]
    command = (
        ["dvc", "exp", "run", "-n", name]
        + (["--dry", "--force"] if args.dry else [])
        + (["--queue"] if args.queue else [])
        + flags
    )
    removing = f", removing {', '.join(removals)} from params.yaml" if removals else ""
    print(f"{path}: {len(settings)} params{removing}")
    print(plan.text())
    if plan.short and not args.dry:
        raise PipelineError(
            f"fashiondiff run {args.preset}: not enough disk: {'; '.join(plan.short)} "
            f"(the plan above; free space, or link DVC's cache: docs/paper-run.md)"
        )
    print("$ " + shlex.join(command), flush=True)
    original = params_file.read_text(encoding="utf-8")
    if removals:
        remove_keys(params_file, removals)
    try:
        code = subprocess.call(command)
    finally:
        if args.dry and removals:
            params_file.write_text(original, encoding="utf-8")  # a dry run leaves the workspace as it was
    if code:
        raise PipelineError(f"{shlex.join(command[:5])} ... exited with {code}")


def _has(tree: dict, key: str) -> bool:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True
