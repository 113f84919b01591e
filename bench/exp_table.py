"""docs/results.md's tables, straight from `dvc exp show`: per experiment, and mean ± std over seeds.

Usage: python bench/exp_table.py [--all-commits] [--names PREFIX ...]

Reads `dvc exp show --json` (every finished experiment of the current commit's baseline, or of
every commit with --all-commits: those run with `dvc exp run`, in the workspace, and those run
through DVC's queue, `dvc exp run --queue` then `dvc queue start -j N`) for the names and params,
and each run's reports/metrics.json (base and tuned per domain) from its commit, keeps the runs
that have it, and prints two Markdown tables: one row per run (seed, lr, LoRA rank, each
domain's base and tuned clip_score / r_precision / fd_clip), then one row per setting (lr, LoRA
rank) with the mean ± sample standard deviation over the seeds that ran it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
from collections import defaultdict

METRIC = re.compile(r"^(catalogue|generic)\.(base|tuned)\.(clip_score|r_precision|fd_clip)$")
METRICS = "reports/metrics.json"  # cache: false, so in git: in every experiment's commit
COLUMNS = [
    (d, m, k)
    for d in ("catalogue", "generic")
    for m in ("base", "tuned")
    for k in ("clip_score", "r_precision", "fd_clip")
]


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def runs(all_commits: bool) -> list[dict]:
    """name, params and headline metrics of every run `dvc exp show` knows (baselines included)."""
    cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
    states = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    found = []

    def add(state: dict, name: str) -> None:
        data = state.get("data") or {}
        params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
        metrics = {k: v for k, v in flatten(committed_metrics(state["rev"])).items() if METRIC.match(k)}
        if len(metrics) == len(COLUMNS):
            found.append({"name": name, "params": params, "metrics": metrics})

    for baseline in states:
        if baseline.get("rev") != "workspace":
            add(baseline, baseline.get("name") or baseline["rev"][:7])
        for group in baseline.get("experiments") or []:
            if not finished(group):
                continue
            for state in group.get("revs", [])[:1]:
                add(state, group.get("name") or state.get("name") or state["rev"][:7])
    return found


def finished(group: dict) -> bool:
    """An experiment with results of its own. A queued or running one (`dvc exp run --queue`)
    is listed with the commit DVC queued it from, whose metrics are the baseline's; a failed
    one has none; one running in the workspace shows as the workspace."""
    state = (group.get("executor") or {}).get("state", "success")
    revs = group.get("revs") or [{}]
    return state == "success" and revs[0].get("rev") != "workspace"


def committed_metrics(rev: str) -> dict:
    """The run's reports/metrics.json, from its commit, or {} where it has none."""
    out = subprocess.run(["git", "show", f"{rev}:{METRICS}"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}


def setting(run: dict) -> tuple:
    p = run["params"]
    return (float(p["lr"]), int(p.get("prior.lora_rank", 0)), int(p.get("decoder.lora_rank", 0)))


def per_run_table(rows: list[dict]) -> list[str]:
    head = "| run | seed | lr | LoRA | " + " | ".join(f"{d} {m} {k}" for d, m, k in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (4 + len(COLUMNS))]
    for run in sorted(rows, key=lambda r: (setting(r), r["params"]["seed"])):
        lr, prior_rank, decoder_rank = setting(run)
        lora = f"{prior_rank}/{decoder_rank}" if prior_rank or decoder_rank else "-"
        values = " | ".join(f"{run['metrics']['.'.join(c)]:g}" for c in COLUMNS)
        lines.append(f"| {run['name']} | {run['params']['seed']} | {lr:g} | {lora} | {values} |")
    return lines


def summary_table(rows: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in rows:
        groups[setting(run)].append(run)
    head = "| lr | LoRA | seeds | " + " | ".join(f"{d} {m} {k}" for d, m, k in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(COLUMNS))]
    for (lr, prior_rank, decoder_rank), members in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
        cells = []
        for column in COLUMNS:
            values = [r["metrics"][".".join(column)] for r in members]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3g} ± {spread:.2g}")
        seeds = ",".join(str(r["params"]["seed"]) for r in sorted(members, key=lambda r: r["params"]["seed"]))
        lora = f"{prior_rank}/{decoder_rank}" if prior_rank or decoder_rank else "-"
        lines.append(f"| {lr:g} | {lora} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-commits", action="store_true", help="experiments of every commit")
    parser.add_argument("--names", nargs="*", help="only runs whose name starts with one of these")
    args = parser.parse_args()
    rows = runs(args.all_commits)
    if args.names:
        rows = [r for r in rows if r["name"].startswith(tuple(args.names))]
    print("\n".join(per_run_table(rows)))
    print()
    print("\n".join(summary_table(rows)))


if __name__ == "__main__":
    main()
