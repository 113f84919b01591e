"""The view of ``params.yaml`` a stage gets: only the keys its ``params:`` list declares.

:func:`stage_params` reads the stage's own ``params:`` list from ``dvc.yaml`` (or
``standin/dvc.yaml``) and returns a :class:`ParamsView` that answers only those keys:
reading an undeclared key fails at once, so DVC always knows what a stage reads and reruns
it exactly when that changes. Usage, in ``stages/<name>.py``::

    params = stage_params("train_prior")       # reads params.yaml, checks, restricts
    params.lr, params.train.warmup_steps        # declared: fine
    params.evaluate.num_prompts                 # undeclared: PipelineError naming the key

With ``FASHIONDIFF_AUDIT=<folder>`` set, each stage process writes
``<folder>/<stage>.<pid>.json`` at exit: the params keys it read and the project modules
it imported, which ``tests/test_pipeline_e2e.py`` checks against ``dvc.yaml``.

A stage validates only the sections (and top-level keys) it declares, and imports only their
modules (``SECTIONS``, lazily): DVC hashes the files a stage lists, so a new ``train`` option,
in ``config/train.py``, reruns the trainings and what follows, never ``extract`` or ``embed``.
``fashiondiff.config.whole`` validates the whole file (commands, tools, tests).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import json
import os
import sys
from pathlib import Path

import yaml
from pydantic import BaseModel, create_model

from fashiondiff.config.schema import Section, flatten, parse, read_params_file
from fashiondiff.errors import PipelineError

# Where stages are declared, relative to the repository root; the stand-in's stages sit in
# a dvc.yaml of their own so that `dvc repro` runs them only as ancestors of a real stage.
DVC_FILES = ("dvc.yaml", "standin/dvc.yaml")
AUDIT_ENV = "FASHIONDIFF_AUDIT"

# params.yaml's top-level keys, in the file's order -> the module under fashiondiff.config that
# defines them (its FIELDS; its optional check(params) runs after validation). A stage imports
# the modules of the keys it declares and no other, so each module is a DVC dep of exactly the
# stages that read its keys.
SECTIONS = {
    "lr": "method", "epochs": "method", "batch_size": "method", "clip_image_size": "method",
    "diffusion_steps": "method", "seed": "method",
    "compute": "compute",
    "data": "data",
    "model": "model",
    "embed": "embed",
    "train": "train", "prior": "train", "decoder": "train",
    "evaluate": "evaluate",
    "serve": "serve",
    "mlflow": "tracking",
    "standin": "standin",
}


class ParamsView:
    """Attribute access to the ``allowed`` keys of a Params (sub)tree; anything else fails.

    ``allowed`` holds dotted keys as ``dvc.yaml`` lists them: a section (``train``) opens
    everything under it, a leaf (``data.caption``) only itself. Every key read is recorded
    in ``reads`` (shared with sub-views) for the audit. ``raw``: the whole file as YAML gave
    it, for tracking alone (the pipeline's parent run logs it; no stage output may read it).
    """

    def __init__(self, node, stage: str, allowed: frozenset[str], prefix: str = "",
                 reads: set[str] | None = None, raw=None):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_allowed", allowed)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "reads", set() if reads is None else reads)
        object.__setattr__(self, "raw", raw)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        key = f"{self._prefix}{name}"
        if _covered(key, self._allowed):
            value = getattr(self._node, name)  # AttributeError for a key its section does not have
            self.reads.add(key)
            return value
        if any(a.startswith(f"{key}.") for a in self._allowed):
            value = getattr(self._node, name)
            if isinstance(value, BaseModel):
                return ParamsView(value, self._stage, self._allowed, f"{key}.", self.reads)
        raise PipelineError(f"stage {self._stage} reads params key {key}, which its params: list in "
                            f"dvc.yaml does not declare (declared: {', '.join(sorted(self._allowed))})")

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to params.{self._prefix}{name}: params are read-only")

    def flat(self) -> dict[str, object]:
        """The declared params only, flat: what a stage may record in its outputs."""
        full = flatten(self._node.model_dump(), self._prefix)
        return {k: v for k, v in full.items() if _covered(k, self._allowed)}


def _covered(key: str, allowed: frozenset[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in allowed for i in range(1, len(parts) + 1))


def declared_params(stage: str, root: str | Path = ".") -> list[str]:
    """The params keys ``stage`` lists in DVC_FILES under ``root`` (only params.yaml's)."""
    for name in DVC_FILES:
        path = Path(root) / name
        if not path.is_file():
            continue
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
        if stage in stages:
            keys: list[str] = []
            body = stages[stage].get("do", stages[stage])  # foreach stages declare under `do`
            for entry in body.get("params", []) or []:
                if isinstance(entry, str):
                    keys.append(entry)
                elif isinstance(entry, dict):
                    keys += [k for file, ks in entry.items() if Path(file).name == "params.yaml" for k in ks]
            return keys
    raise PipelineError(f"stage {stage}: not declared in {' or '.join(DVC_FILES)} under {Path(root).resolve()}")


def stage_params(stage: str, params_path: str | Path = "params.yaml", root: str | Path | None = None) -> ParamsView:
    """Read ``params_path``, validate the sections ``stage`` declares, return their view.

    ``root`` (where dvc.yaml is) defaults to the repository that holds this package's
    stages, so a stage run by hand from another folder still finds its declaration.
    """
    raw = read_params_file(params_path)
    root = Path(root) if root is not None else _repo_root()
    declared = declared_params(stage, root)
    params = validated(raw, [key.split(".")[0] for key in declared])
    view = ParamsView(params, stage, frozenset(declared), raw=raw)
    _audit_at_exit(stage, view)
    return view


def validated(raw, keys) -> Section:
    """The top-level ``keys`` of the params tree ``raw`` (as ``yaml.safe_load`` gives it),
    validated by their modules alone (imported here, lazily), then their cross-section checks."""
    keys = _ordered(keys)
    tree = {k: raw[k] for k in keys if k in raw} if isinstance(raw, dict) else raw
    params = parse(params_model(keys), tree)
    for module in dict.fromkeys(SECTIONS[k] for k in keys):
        check = getattr(_module(module), "check", None)
        if check is not None:
            check(params)
    return params


@functools.cache
def params_model(keys: tuple[str, ...]) -> type[Section]:
    """A pydantic model of the top-level ``keys`` alone, each typed by its section's module."""
    fields = {k: (_module(SECTIONS[k]).FIELDS[k], ...) for k in keys}
    return create_model("Params", __base__=Section, __module__=__name__, **fields)


def _ordered(keys) -> tuple[str, ...]:
    keys = set(keys)
    if unknown := sorted(keys - set(SECTIONS)):
        raise PipelineError(f"params: unknown key {unknown[0]} (known: {', '.join(sorted(SECTIONS))})")
    return tuple(k for k in SECTIONS if k in keys)


def _module(name: str):
    return importlib.import_module(f"fashiondiff.config.{name}")


def _repo_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    main = sys.modules.get("__main__")
    script = Path(getattr(main, "__file__", "") or ".").resolve()
    if script.parent.name == "stages" and (script.parents[1] / DVC_FILES[0]).is_file():
        return script.parents[1]
    return Path.cwd()


def _audit_at_exit(stage: str, view: ParamsView) -> None:
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return

    def write() -> None:
        package = Path(__file__).resolve().parents[1]
        modules = sorted(
            str(Path(m.__file__).resolve().relative_to(package.parent))
            for m in list(sys.modules.values())
            if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(package))
        Path(folder).mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "params_read": sorted(view.reads), "modules": modules}
        (Path(folder) / f"{stage}.{os.getpid()}.json").write_text(json.dumps(record, indent=1))

    atexit.register(write)
