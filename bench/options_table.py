"""docs/results.md's training-options ablation, from the experiments' commits.

Usage: python bench/options_table.py [--baseline REV] [--mlflow URI]

Each option ran as a queued DVC experiment per seed, named ``s<seed>-<option>`` (the recipe is in
docs/results.md); seed 0 of the default is the baseline commit itself (``--baseline``, default
HEAD), seeds 1 and 2 are ``s1-default`` and ``s2-default``. For every run it reads, from the
run's commit, ``reports/train_prior.json`` and ``reports/train_decoder.json`` (the last
validation's ``val_loss``) and ``reports/metrics.json`` (the tuned model's ``clip_score``,
``r_precision`` and ``fd_clip`` per domain), then prints two Markdown tables: one row per run,
then per option the mean ± sample standard deviation over its seeds and, as Δ, the mean ± sample
standard deviation of the per-seed differences from the default (same seed: same data and base
model).

``--mlflow URI`` (the pipeline's store, ``sqlite:///mlflow.db``) also checks every experiment's
row against its MLflow runs, found by their ``dvc.exp_name`` tag: the last ``val_loss`` of its
``train_prior`` and ``train_decoder`` runs and the ``<domain>.<metric>`` values of its
``evaluate`` run. Seed 0's default ran as ``dvc repro`` and has no experiment name; it is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

OPTIONS = {  # name -> what it sets (the -S arguments of docs/results.md's recipe)
    "default": "nothing (the method)",
    "snr5": "`min_snr_gamma` 5",
    "noff": "`noise_offset` 0.05",
    "ipert": "`input_perturbation` 0.1",
    "huber": "`loss` huber, `huber_delta` 0.1",
    "ema": "`ema_decay` 0.99",
    "ema10": "`ema_decay` 0.9, `ema_every` 10",
}
SEEDS = (0, 1, 2)
COLUMNS = [
    ("prior val_loss", "train_prior.json", ("val_loss",)),
    ("decoder val_loss", "train_decoder.json", ("val_loss",)),
    ("catalogue clip_score", "metrics.json", ("catalogue", "tuned", "clip_score")),
    ("catalogue r_precision", "metrics.json", ("catalogue", "tuned", "r_precision")),
    ("catalogue fd_clip", "metrics.json", ("catalogue", "tuned", "fd_clip")),
    ("generic clip_score", "metrics.json", ("generic", "tuned", "clip_score")),
    ("generic fd_clip", "metrics.json", ("generic", "tuned", "fd_clip")),
]


def read(rev: str, name: str) -> dict:
    out = subprocess.run(["git", "show", f"{rev}:reports/{name}"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def experiment_revs() -> dict[str, str]:
    """Every experiment ref's name -> its commit."""
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {ref.rsplit("/", 1)[1]: rev for ref, rev in (line.split() for line in out.splitlines())}


def values(rev: str) -> list[float]:
    files: dict[str, dict] = {}
    row = []
    for _, name, path in COLUMNS:
        tree = files.setdefault(name, read(rev, name))
        for key in path:
            tree = tree[key]
        row.append(float(tree))
    return row


MLFLOW_KEYS = {
    "train_prior.json": lambda path: ("train_prior", "val_loss"),
    "train_decoder.json": lambda path: ("train_decoder", "val_loss"),
    "metrics.json": lambda path: ("evaluate", f"{path[0]}.{path[2]}"),
}


def check_mlflow(uri: str, named: dict[str, list[float]]) -> int:
    """Compare each experiment's row with the values its MLflow runs hold; return the mismatches."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    bad = 0
    for name, row in named.items():
        runs = client.search_runs(experiments, f"tags.`dvc.exp_name` = '{name}'", order_by=["start_time DESC"])
        latest: dict[str, dict[str, float]] = {}
        for run in runs:  # newest first: a stage rerun in the same experiment keeps its last run
            latest.setdefault(run.data.tags.get("fashiondiff.stage", ""), run.data.metrics)
        for (column, name_json, path), value in zip(COLUMNS, row):
            stage, key = MLFLOW_KEYS[name_json](path)
            logged = latest.get(stage, {}).get(key)
            if logged is None or abs(logged - value) > 1e-5 * max(1.0, abs(value)):
                print(f"mlflow: {name} {column}: the report says {value:.6g}, MLflow holds {logged}")
                bad += 1
    print(f"mlflow: {len(named)} experiments x {len(COLUMNS)} values checked, {bad} disagree")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="the commit that is seed 0's default run")
    parser.add_argument("--mlflow", metavar="URI", help="check each experiment's row against its MLflow runs")
    args = parser.parse_args()
    revs = experiment_revs()
    runs: dict[tuple[str, int], list[float]] = {}
    for option in OPTIONS:
        for seed in SEEDS:
            rev = args.baseline if (option, seed) == ("default", 0) else revs.get(f"s{seed}-{option}")
            if rev is not None:
                runs[option, seed] = values(rev)
    head = " | ".join(name for name, _, _ in COLUMNS)
    print(f"| run | {head} |\n|" + " --- |" * (1 + len(COLUMNS)))
    for (option, seed), row in runs.items():
        print(f"| s{seed}-{option} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    print(f"\n| option | seeds | {head} |\n|" + " --- |" * (2 + len(COLUMNS)))
    for option, label in OPTIONS.items():
        seeds = [s for s in SEEDS if (option, s) in runs]
        if not seeds:
            continue
        cells = []
        for j in range(len(COLUMNS)):
            vals = [runs[option, s][j] for s in seeds]
            cell = f"{statistics.mean(vals):.3g} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2g}"
            paired = [runs[option, s][j] - runs["default", s][j] for s in seeds if ("default", s) in runs]
            if option != "default" and len(paired) > 1:
                cell += f" (Δ {statistics.mean(paired):+.2g} ± {statistics.stdev(paired):.2g})"
            cells.append(cell)
        print(f"| {label} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if args.mlflow:
        named = {f"s{seed}-{option}": row for (option, seed), row in runs.items() if (option, seed) != ("default", 0)}
        raise SystemExit(1 if check_mlflow(args.mlflow, named) else 0)


if __name__ == "__main__":
    main()
