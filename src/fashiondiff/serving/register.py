"""The ``register`` stage's work: the tuned pipeline as an MLflow pyfunc model in the registry.

Usage (``stages/register.py``)::

    with stage_run("register", params) as tracker:
        register("models", params, tracker)

Real pipelines are gigabytes, and logging copies them into the artifact store, so only a
pipeline of at most ``serve.max_log_mb`` is logged: the embedded default's few MB are,
Kandinsky 2.1's 13.2 GB (float32) are not unless that param is raised (0: never). The model carries
the prior and decoder folders (artifacts), this package's code (``code/``), the exact
versions of what it imports (requirements) and the sampling defaults of the run.
Registering is idempotent: folders byte-identical to a registered version's (``dvc repro
--force`` reproduces them bit for bit) are not registered again; that version is reported.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from fashiondiff.serving.registry import find_model_version, log_model

ENTRY = Path(__file__).with_name("mlflow_model.py")  # models from code: what MLflow runs to build it
PACKAGE = Path(__file__).resolve().parents[1]  # src/fashiondiff, shipped as the model's code/
TAG_DIGEST = "fashiondiff.models_sha256"  # on each version: the digest of its two folders
# What the model imports at serving time, pinned to the versions that logged it.
REQUIREMENTS = (
    "mlflow",
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "peft",
    "sentencepiece",
    "pillow",
    "numpy",
    "pandas",
)
EXAMPLE_STEPS = 2  # the input example's decoder steps: MLflow runs it once while logging


def register(models_dir: str | Path, params, tracker) -> str:
    """Log ``models_dir/{prior,decoder}`` and register them as ``serve.registered_model``.

    Returns the model's version ("" when nothing was logged: too large, or tracking off)
    and says what happened on stderr.
    """
    folders = {part: Path(models_dir) / part for part in ("prior", "decoder")}
    size_mb = sum(_megabytes(folder) for folder in folders.values())
    cap, name = params.serve.max_log_mb, params.serve.registered_model
    if size_mb > cap:
        _say(
            f"{models_dir} is {size_mb:.0f} MB, over serve.max_log_mb {cap:g}: not logged "
            f"(raise serve.max_log_mb to log and register it)"
        )
        return ""
    if not tracker.enabled:
        _say("tracking is off (FASHIONDIFF_TRACKING): not logged")
        return ""
    digest = folders_digest(folders.values())
    version = find_model_version(tracker, name, TAG_DIGEST, digest)
    if version:
        _say(f"{models_dir} is byte for byte {name} version {version}: not registered again")
    else:
        version = _log(folders, params, tracker, {TAG_DIGEST: digest})
    tracker.log_summary({"model_version": int(version)})
    _say(
        f"{name} version {version} ({size_mb:.1f} MB): "
        f"mlflow models serve -m models:/{name}/{version} --env-manager local"
    )
    return version


def folders_digest(folders) -> str:
    """sha256 over every file's path (relative to its folder's parent) and bytes, in order."""
    total = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            total.update(str(path.relative_to(Path(folder).parent)).encode() + b"\0")
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    total.update(block)
    return total.hexdigest()


def requirements() -> list[str]:
    """``name==version`` of each package the model needs, as installed here."""
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def _log(folders: dict[str, Path], params, tracker, tags: dict[str, str]) -> str:
    from fashiondiff.sampling import sampling_from_params
    from fashiondiff.serving import pyfunc

    with tempfile.TemporaryDirectory(prefix="fashiondiff-code-") as tmp:
        code = Path(tmp) / PACKAGE.name
        shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi"))
        return log_model(
            tracker,
            ENTRY,
            params.serve.registered_model,
            tags,
            artifacts={part: str(folder) for part, folder in folders.items()},
            signature=pyfunc.signature(),
            input_example=pyfunc.input_example(EXAMPLE_STEPS),
            code_paths=[str(code)],
            pip_requirements=requirements(),
            model_config=pyfunc.model_config(sampling_from_params(params)),
        )


def _megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _say(text: str) -> None:
    print(f"register: {text}", file=sys.stderr)
