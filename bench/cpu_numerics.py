"""Benchmark: do the CPU kernels' instruction sets change the pipeline's numbers, and what does
pinning them cost? The embed stage and both trainings, run as the stages run (one thread, their
own processes) under several settings of the variables that choose CPU code paths.

Usage: python bench/cpu_numerics.py PROJECT [--epochs N] [--repeats 2] [--out reports/cpu_numerics.json]

PROJECT is a checkout after `dvc repro`: the stages read its data/extracted/train, models/ and
params.yaml (``epochs`` replaced by --epochs if given) and write into a scratch folder; nothing
in PROJECT changes. Per setting it records the
SHA-256 of the embedding cache's arrays and of each tuned network's weights (the --repeats runs
of a setting must agree bit for bit, or it stops), and each stage's CPU seconds, the median
over the runs. Settings:

- default: what torch picks on this CPU (torch.backends.cpu.get_cpu_capability()).
- aten-avx2: ATEN_CPU_CAPABILITY=avx2 (ATen's own vectorised kernels).
- avx2: that, plus oneDNN's JIT kernels (ONEDNN_MAX_CPU_ISA=AVX2: convolutions) and MKL's
  conditional numerical reproducibility branch (MKL_CBWR=AVX2,STRICT: matrix products).
- portable: ATEN_CPU_CAPABILITY=default, ONEDNN_MAX_CPU_ISA=SSE41, MKL_CBWR=COMPATIBLE, STRICT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SETTINGS = {
    "default": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
    "portable": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE,STRICT"},
}
PINNED = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = Path(__file__).resolve().parents[1] / "stages"


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run(cwd: Path, env: dict, argv: list[str]) -> float:
    """The CPU seconds (user + system) the stage's process took: on a machine shared with other
    jobs, wall-clock time measures them as much as the stage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{argv[0]} failed under {env.get('ATEN_CPU_CAPABILITY', 'default')}:\n{out.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def one_setting(project: Path, params: dict, settings: dict, scratch: Path) -> dict:
    """The three stages in ``scratch`` (its own params.yaml, ``models`` linked to the project's)."""
    (scratch / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (scratch / "models").symlink_to(project / "models")  # params name the base as models/base/...
    env = {k: v for k, v in os.environ.items() if k not in PINNED}
    env.update(settings, PYTHONPATH=str(SRC), FASHIONDIFF_TRACKING="off", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    seconds = {
        "embed": run(scratch, env, [STAGES / "embed.py", project / "data/extracted/train", "train", scratch / "cache"])
    }
    for kind in ("prior", "decoder"):
        seconds[f"train_{kind}"] = run(
            scratch,
            env,
            [
                STAGES / f"train_{kind}.py",
                "--cache",
                scratch / "cache",
                "--out",
                scratch / kind,
                "--checkpoints",
                scratch / "ckpt" / kind,
                "--summary",
                scratch / f"{kind}.json",
                "--plot",
                scratch / f"{kind}.csv",
            ],
        )
    capability = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "capability": capability,
        "cache": digest([p for p in (scratch / "cache").iterdir() if p.suffix == ".npy"]),
        "prior": digest(list((scratch / "prior/prior").glob("*.safetensors"))),
        "decoder": digest(list((scratch / "decoder/unet").glob("*.safetensors"))),
        "loss_last_epoch": {
            k: json.loads((scratch / f"{k}.json").read_text())["loss_last_epoch"] for k in ("prior", "decoder")
        },
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--epochs", type=int, default=None, help="instead of params.yaml's (longer: timings)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("reports/cpu_numerics.json"))
    args = parser.parse_args()
    project = args.project.resolve()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["epochs"] = args.epochs or params["epochs"]
    rows: dict[str, dict] = {}
    for name, settings in SETTINGS.items():
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="cpu-numerics-") as tmp:
                runs.append(one_setting(project, params, settings, Path(tmp)))
        for r in runs[1:]:
            if any(r[k] != runs[0][k] for k in ("cache", "prior", "decoder")):
                raise SystemExit(f"{name}: two runs of one setting differ: {runs}")
        row = {
            **runs[0],
            "settings": settings,
            "cpu_seconds": {k: round(statistics.median(r["seconds"][k] for r in runs), 1) for k in runs[0]["seconds"]},
        }
        rows[name] = row
        print(
            f"{name:10} {row['capability']:8} cache {row['cache']} prior {row['prior']} decoder {row['decoder']} "
            f"CPU seconds {row['cpu_seconds']}",
            flush=True,
        )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    report = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": 1,
        "repeats": args.repeats,
        "project": str(args.project),
        "epochs": params["epochs"],
        "settings": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
