"""embed and evaluate under `accelerate launch` (two gloo processes on the CPU): the outputs one
process writes; a process that dies ends both within seconds, with one line and no output; a
stopped or killed run resumes; a full disk (a file-size limit) is one line and resumable; and
evaluate's memory does not grow with the number of prompts."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import params_tree, replaced, repo_params
from pipeline_fixtures import REPO, run_stage, stage_params
from test_evaluate import NAMES, OBJECTS, RecordingTracker, extracted_folder

from fashiondiff.processes import accelerate_launch, project_env

PROCESS_TIMEOUT = 120  # compute.timeout_s in these tests: a hang fails the test, not the suite
GLOO = {"ACCELERATE_USE_CPU": "1"}  # accelerate's processes on the CPU


@pytest.fixture
def cpu_processes() -> list[str]:
    return accelerate_launch(2)


def same_files(a: Path, b: Path) -> list[str]:
    """The relative paths of every file under ``a``, after checking ``b`` has the same, byte for byte."""
    names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def start(cwd: Path, params: dict, script: str, *args, launcher: list[str] | None = None, **env: str):
    """Start ``stages/<script>`` in ``cwd`` (as run_stage does) without waiting for it."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = (launcher or [sys.executable]) + [str(REPO / "stages" / script), *map(str, args)]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=project_env(FASHIONDIFF_TRACKING="off", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_pids(launcher: int, deadline: float) -> dict[int, int]:
    """Process number -> pid of the launcher's two processes."""
    while time.monotonic() < deadline:
        ranks = {}
        for pid in children(launcher):
            try:
                env = dict(
                    v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v
                )
            except OSError:
                continue
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = pid
        if len(ranks) == 2:
            return ranks
        time.sleep(0.05)
    pytest.fail("the launcher's two processes did not start")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, what: str, limit: float = 120, proc=None):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    pytest.fail(f"no {what} in {limit} s")


def file_limit(size: int) -> list[str]:
    """A launcher that sets RLIMIT_FSIZE (`ulimit -f`) before it becomes the stage's Python: a
    write past ``size`` bytes then fails with EFBIG (Python ignores SIGXFSZ)."""
    code = (
        f"import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({size}, {size})); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


def error_lines(stderr: str) -> list[str]:
    """The processes' one-line errors: under the launcher they share one stderr, so a line may
    start after another process's progress bar (tqdm ends its lines with a carriage return)."""
    return [line[line.index("error: ") :] for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]


def all_gone_after(proc: subprocess.Popen, ranks: dict[int, int], killed: float) -> str:
    """Wait for the launcher after a kill at ``killed``: every process gone within 30 s, a
    non-zero exit; its stderr."""
    _, stderr = proc.communicate(timeout=60)
    print(f"every process gone {time.monotonic() - killed:.1f} s after the kill")
    assert time.monotonic() - killed < 30 and not any(alive(p) for p in ranks.values())
    assert proc.returncode != 0
    return stderr


# --- embed ------------------------------------------------------------------------------------


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_embed_in_two_processes_writes_the_one_process_cache(
    tmp_path, tiny_base, extracted, train_cache, cpu_processes
):
    params = stage_params(tiny_base, **{"compute.timeout_s": PROCESS_TIMEOUT})
    result = run_stage(
        tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", launcher=cpu_processes, **GLOO
    )
    assert "2 processes" in result.stdout
    assert len(same_files(train_cache, tmp_path / "cache")) == 17
    assert not (tmp_path / ".cache.partial").exists()


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_embed_loader_killed_in_one_process_stops_both_then_resumes(
    tmp_path, tiny_base, extracted, train_cache, cpu_processes
):
    """Process 1's image loader killed (kill -9) while process 0 is held at a hand-over: both gone
    within 30 s, one line, no cache; the rerun (two processes) resumes to the one-process cache."""
    params = stage_params(tiny_base, **{"compute.timeout_s": PROCESS_TIMEOUT})
    progress = tmp_path / ".cache.partial" / "progress.json"
    proc = start(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", launcher=cpu_processes, **GLOO)
    ranks = rank_pids(proc.pid, time.monotonic() + 60)

    def captions_done():
        try:
            return json.loads(progress.read_text())["caption_batches"] == [[0, 3]]
        except (OSError, ValueError, KeyError):
            return False

    wait_for(captions_done, "finished captions", proc=proc)
    os.kill(ranks[0], signal.SIGSTOP)  # process 1 then waits at its first image hand-over, loader alive
    try:
        (loader,) = wait_for(lambda: children(ranks[1]), "process 1's image loader", 30)
        os.kill(loader, signal.SIGKILL)
    finally:
        os.kill(ranks[0], signal.SIGCONT)
    stderr = all_gone_after(proc, ranks, time.monotonic())
    assert any(line.startswith("error: embed: the image loader process died") for line in error_lines(stderr)), stderr
    assert not (tmp_path / "cache").exists()

    resumed = run_stage(
        tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", launcher=cpu_processes, **GLOO
    )
    assert "embed: resuming" in resumed.stdout and "8/8 captions" in resumed.stdout
    same_files(train_cache, tmp_path / "cache")


@pytest.mark.slow  # the launcher's SIGTERM path is the loader test's process 0; this is one process
def test_embed_sigterm_keeps_the_finished_batches_and_the_rerun_resumes(tmp_path, tiny_base, extracted, train_cache):
    """SIGTERM (held with SIGSTOP until sent, so that the run cannot finish first) stops the
    stage with one line saying what is kept; the rerun resumes to the one-process cache."""
    params = stage_params(tiny_base)
    proc = start(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache")
    wait_for(lambda: (tmp_path / ".cache.partial" / "progress.json").is_file(), "the partial cache", proc=proc)
    os.kill(proc.pid, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143  # 128 + SIGTERM, as the training stages
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: embed: stopped by SIGTERM; ") and last.endswith(
        ("rerun to resume", "no batch was finished yet, rerun to start")
    ), last
    assert not (tmp_path / "cache").exists()
    resumed = run_stage(tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache")
    if "the finished" in last and "the finished 0/8 captions, 0/16 images" not in last:
        assert "resuming" in resumed.stdout
    same_files(train_cache, tmp_path / "cache")


SWALLOWED = """
import os, signal
from fashiondiff.errors import cli
from fashiondiff.spread import Ranks, stop_on_signals

def after_fork():  # the SIGTERM's exception is raised in here, where Python drops it
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(3):
        pass

os.register_at_fork(after_in_parent=after_fork)

@cli
def main():
    with stop_on_signals():
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
        print("past the fork", flush=True)
        Ranks("embed", 60.0).gather(None, "a batch")
        print("past the hand-over", flush=True)

main()
"""


def test_a_signal_whose_exception_python_dropped_stops_at_the_next_hand_over():
    """A SIGTERM during a fork's after-fork hooks (a DataLoader starting its workers): Python drops
    the handler's exception there, silently inside stop_on_signals; the stage stops with its one
    line at the next hand-over instead of running to its end."""
    result = subprocess.run(
        [sys.executable, "-c", SWALLOWED], capture_output=True, text=True, env=project_env(), timeout=60
    )
    assert result.stdout.splitlines() == ["past the fork"], result.stdout + result.stderr
    assert result.returncode == 143 and result.stderr == "error: stopped by SIGTERM\n", result.stderr


LOADER_DIES_TOO = """
import os, signal, time
from torch.utils.data._utils import signal_handling
from fashiondiff.errors import cli
from fashiondiff.spread import Interrupted, stop_on_signals, with_kept

both = {signal.SIGTERM, signal.SIGCHLD}

@cli
def main():
    with stop_on_signals():
        signal_handling._set_SIGCHLD_handler()  # what a DataLoader with workers installs
        signal.pthread_sigmask(signal.SIG_BLOCK, both)
        loader = os.fork()
        if loader == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            time.sleep(60)
            os._exit(0)
        signal_handling._set_worker_pids(1, (loader,))  # torch watches it, as a loader's
        os.kill(loader, signal.SIGTERM)  # the agent's killpg: the loader and this process
        while open(f"/proc/{loader}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)  # both at once, SIGTERM's handler first
            for _ in range(3):
                pass
        except Interrupted as exc:
            for _ in range(3):  # where torch's handler would raise the loader's death
                pass
            raise with_kept("embed", exc, "the finished batches are kept") from None

main()
"""


def test_the_loader_dying_of_the_same_sigterm_leaves_the_stop_line():
    """The agent's SIGTERM goes to the stage process's group: its DataLoader process dies of it
    too, and torch's SIGCHLD handler raises that death wherever the process is next, here while
    it words its stop. The stop wins: one line, status 143, no traceback."""
    result = subprocess.run(
        [sys.executable, "-c", LOADER_DIES_TOO], capture_output=True, text=True, env=project_env(), timeout=60
    )
    assert result.returncode == 143, result.stderr
    assert result.stderr == "error: embed: stopped by SIGTERM; the finished batches are kept\n", result.stderr


def test_embed_full_disk_at_the_start_names_the_file(tmp_path, tiny_base, extracted, train_cache):
    """The arrays are reserved on disk before any encoding (a full disk mid-run would otherwise be
    a SIGBUS at a write into a memory map): no room is one line at once, naming the file; an
    earlier cache in place is left as it was (the rerun with room: any of the tests above)."""
    shutil.copytree(train_cache, tmp_path / "cache")
    (tmp_path / "cache" / "meta.json").write_text("{}")  # stands for an older cache, to be replaced
    old = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    params = stage_params(tiny_base)
    full = run_stage(
        tmp_path, params, "embed.py", extracted, "train", tmp_path / "cache", check=False, launcher=file_limit(2048)
    )
    assert full.returncode == 1
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / '.cache.partial'}/") and ".npy: cannot write, file too large" in last
    assert "rerun to resume" in last and "Traceback" not in full.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == old


# --- evaluate ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, inception_weights):
    """Two different tiny models (base, tuned), two extracted held-out files, FID weights, and
    the one-process run's reports (``root/one``)."""
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    root = tmp_path_factory.mktemp("spread_evaluate")
    spec = TinySpec(clip_image_size=32, clip_patch_size=16)
    save_pipelines(build_tiny((NAMES + OBJECTS) * 2, spec, seed=0), root / "base")
    save_pipelines(build_tiny((NAMES + OBJECTS) * 2, spec, seed=1), root / "tuned")
    rng = np.random.default_rng(0)
    folders = {
        "catalogue": extracted_folder(root / "validation", NAMES, 2, rng),
        "generic": extracted_folder(root / "generic", OBJECTS, 1, rng, first_product=500),
    }
    params = params_tree(
        **{
            "clip_image_size": 32,
            "diffusion_steps": 2,
            "data.holdout_fraction": 0.5,
            "model.resolution": 64,
            "model.prior": str(root / "base" / "prior"),
            "model.decoder": str(root / "base" / "decoder"),
            "evaluate.num_prompts": 5,
            "evaluate.prior_steps": 2,
            "evaluate.batch_size": 2,
            "evaluate.edit_items": 3,
            "evaluate.edit_strengths": [0.5],
            "evaluate.r_precision_candidates": 4,
            "evaluate.workers": 1,
            "compute.timeout_s": PROCESS_TIMEOUT,
            "evaluate.fid_weights": "weights/inception/weights.pth",
        }
    )
    args = ["--catalogue", folders["catalogue"], "--generic", folders["generic"], "--tuned", root / "tuned"]

    def cwd(name: str) -> Path:  # a run's folder, with the FID weights where the stage wants them
        (root / name / "weights" / "inception").mkdir(parents=True)
        shutil.copy(inception_weights, root / name / "weights" / "inception" / "weights.pth")
        return root / name

    run_stage(cwd("one"), params, "evaluate.py", *args, "--reports", "reports")
    return root, params, args, cwd


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
@pytest.mark.parametrize("n", [2, 3])
def test_evaluate_in_n_processes_writes_the_same_samples_and_metrics(evaluation, n):
    """Every sample byte for byte and evaluation.json as is; in metrics.json the CLIP scores,
    R-precision and counts exactly, fd_clip and fid within one unit of their sixth digit (each
    process sums its share of the real images' statistics: float64 round-off only). Three
    processes split the work unevenly: 5 prompts in batches of 2 (a short last batch), a share
    that cuts across base's and tuned's tasks; every forward pass still sees the batch it sees
    alone."""
    root, params, args, cwd = evaluation
    run_stage(cwd(f"n{n}"), params, "evaluate.py", *args, "--reports", "reports", launcher=accelerate_launch(n), **GLOO)
    one, two = root / "one" / "reports", root / f"n{n}" / "reports"
    names = same_files(one / "samples", two / "samples")
    # domains x models x prompts; x (strength 0.5, mix) x 3 edited photos; two real_images.txt, three figures
    assert len(names) == 2 * 2 * 5 + 2 * 2 * 2 * 3 + 2 + 3
    assert (one / "evaluation.json").read_bytes() == (two / "evaluation.json").read_bytes()
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    for domain in a:
        for model in a[domain]:
            x, y = a[domain][model], b[domain][model]
            assert (
                x.keys()
                == y.keys()
                == {
                    "clip_score",
                    "r_precision",
                    "fd_clip",
                    "fid",
                    "fid_n_generated",
                    "fid_n_real",
                    "edit_fidelity_s50",
                    "edit_clip_score_s50",
                    "mix_fidelity",
                    "mix_clip_score",
                }
            )
            for key in x:
                if key in ("fd_clip", "fid"):
                    assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-9), (domain, model, key)
                else:
                    assert y[key] == x[key], (domain, model, key)
    assert a["catalogue"]["base"] != a["catalogue"]["tuned"]  # two different models


@pytest.mark.slow  # two runs of the stage (~40 s on 2 free cores)
def test_evaluate_process_killed_stops_both_and_one_process_resumes(evaluation, cpu_processes):
    """kill -9 of process 1 after the first round: both gone within 30 s, one line, no outputs;
    one process then resumes the two's partial folder to the one-process reports."""
    root, params, args, cwd = evaluation
    folder = cwd("killed")
    proc = start(folder, params, "evaluate.py", *args, "--reports", "reports", launcher=cpu_processes, **GLOO)
    ranks = rank_pids(proc.pid, time.monotonic() + 60)
    wait_for(lambda: (folder / "reports/.samples.partial/.progress/base.json").is_file(), "a finished round", proc=proc)
    os.kill(ranks[1], signal.SIGKILL)
    stderr = all_gone_after(proc, ranks, time.monotonic())
    lines = error_lines(stderr)
    assert any(line.startswith("error: evaluate: ") and "rerun to resume" in line for line in lines), stderr
    assert sorted(p.name for p in (folder / "reports").iterdir()) == [".samples.partial"]

    resumed = run_stage(folder, params, "evaluate.py", *args, "--reports", "reports")
    assert "evaluate: resuming" in resumed.stdout
    same_files(root / "one" / "reports", folder / "reports")


@pytest.mark.slow  # three runs of the stage
def test_evaluate_full_disk_keeps_the_outputs_and_the_rerun_resumes(evaluation):
    """Under a file-size limit that the samples fit and the grid does not: one line naming the
    grid, the previous reports untouched; with room, the rerun reads the samples back."""
    root, params, args, cwd = evaluation
    folder = cwd("full")
    params = {**params, "evaluate": {**params["evaluate"], "fid_weights": ""}}  # FID's setup copies 100 MB
    run_stage(folder, params, "evaluate.py", *args, "--reports", "reports")
    reference = folder / "reference"
    shutil.copytree(folder / "reports", reference)
    before = {p: p.read_bytes() for p in (folder / "reports").rglob("*") if p.is_file()}
    full = run_stage(
        folder, params, "evaluate.py", *args, "--reports", "reports", check=False, launcher=file_limit(64 * 1024)
    )
    assert full.returncode == 1
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("error: reports/.samples.partial/grid.png: cannot write, file too large;"), last
    assert "rerun to resume" in last and "Traceback" not in full.stderr
    assert {
        p: p.read_bytes() for p in (folder / "reports").rglob("*") if p.is_file() and ".samples.partial" not in str(p)
    } == before
    resumed = run_stage(folder, params, "evaluate.py", *args, "--reports", "reports")
    assert "evaluate: resuming" in resumed.stdout and "14 of base's batches, 14 of tuned's batches" in resumed.stdout
    same_files(reference, folder / "reports")


@pytest.mark.slow  # over 10 s (make test-fast leaves it out)
def test_evaluate_holds_a_batch_of_images_whatever_the_number_of_prompts(tmp_path, monkeypatch):
    """The in-suite stand-in for bench/bench_spread.py's RSS at 2,000 vs 200 prompts: the most
    images alive at any hand-over does not grow with evaluate.num_prompts (a list of every
    sample, as evaluate once kept, grows with it); prompts past the held-out rows are drawn
    again and evaluation.json says so."""
    from PIL import Image

    from fashiondiff.evaluate import samples
    from fashiondiff.evaluate.run import ModelPair, evaluate
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    save_pipelines(
        build_tiny(NAMES + OBJECTS, TinySpec(clip_image_size=32, clip_patch_size=16), seed=0), tmp_path / "models"
    )
    rng = np.random.default_rng(0)
    folders = {
        "catalogue": extracted_folder(tmp_path / "validation", NAMES, 2, rng),
        "generic": extracted_folder(tmp_path / "generic", OBJECTS, 1, rng, first_product=500),
    }
    live = []
    take = samples.Partial.take

    def counting(self, results):  # Pillow's own count of the image buffers alive now
        gc.collect()
        stats = Image.core.get_stats()
        live.append(stats["allocated_blocks"] + stats["reused_blocks"] - stats["freed_blocks"] - stats["blocks_cached"])
        return take(self, results)

    monkeypatch.setattr(samples.Partial, "take", counting)
    base = repo_params()
    pair = ModelPair(str(tmp_path / "models" / "prior"), str(tmp_path / "models" / "decoder"))
    peaks = {}
    for n in (3, 9):
        params = replaced(
            base,
            clip_image_size=32,
            diffusion_steps=2,
            model=replaced(base.model, resolution=64),
            evaluate=replaced(
                base.evaluate,
                num_prompts=n,
                prior_steps=2,
                batch_size=2,
                workers=1,
                edit_items=2,
                edit_strengths=[0.5],
                r_precision_candidates=3,
            ),
        )
        live.clear()
        evaluate(folders, pair, pair, params, tmp_path / f"reports{n}", RecordingTracker())
        peaks[n] = max(live)
    assert peaks[9] <= peaks[3] + 2, peaks  # every sample kept: + 2 models x 2 domains x 6 prompts
    details = json.loads((tmp_path / "reports9" / "evaluation.json").read_text())
    assert details["generic"]["prompts_with_replacement"] and details["generic"]["real_images"] == len(OBJECTS)
    assert len(list((tmp_path / "reports9" / "samples" / "generic" / "base").glob("*.png"))) == 9
    assert not json.loads((tmp_path / "reports3" / "evaluation.json").read_text())["catalogue"][
        "prompts_with_replacement"
    ]
