"""docs/paper-run.md as written, on a fresh copy of the repository: every ```bash block marked
RUNNABLE runs verbatim, in order; each block marked DOWNLOAD is replaced by a stand-in at the
same paths (small FashionGen-layout files, a COCO-like folder that the page's own
`fashiondiff convert` turns into the generic file, copies of tiny base folders of the
stand-in's classes, a random Inception-v3 file fetched by the block's own `dvc import-url` from
a local path instead of its URL). The sizes are the end-to-end test's SMALL ones (params.yaml
of the copy), so `fashiondiff run paper` trains a few steps; presets/paper.yaml's
`evaluate.num_prompts: 1000` runs as SMALL's count (PAPER_PROMPTS below). The README's paper
command is the page's, character for character."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml
from doc_blocks import DOWNLOAD, marked_blocks, run_block
from inception_fixtures import random_inception_weights
from test_pipeline_e2e import DVC, SMALL, fresh_copy, sh, stale_stages

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs/paper-run.md"
REAL_STAGES = {
    "extract@train",
    "extract@validation",
    "extract@generic",
    "embed@train",
    "embed@validation",
    "train_prior",
    "train_decoder",
    "evaluate",
    "register",
}

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")]


def stand_in_for(block: list[str], root: Path, downloads: Path) -> None:
    """Put at the paths a DOWNLOAD block writes what stands in for the download."""
    text = " ".join(block)
    if "data/raw" in text:
        (root / "data/raw").mkdir(parents=True)
        for name in re.findall(r"/path/to/(\S+\.h5)", text):
            shutil.copy(downloads / name, root / "data/raw" / name)
        if "images.cocodataset.org" in text:  # COCO val2017 and its captions, as the zips unpack
            assert re.search(r"unzip -q val2017\.zip -d data/coco", text), text
            shutil.copytree(downloads / "coco", root / "data/coco")
    elif "hf download" in text:
        for repo, folder in re.findall(r"hf download (\S+) --local-dir (\S+)", text):
            part = "prior" if repo.endswith("-prior") else "decoder"
            shutil.copytree(downloads / "base" / part, root / folder)
            meta = root / folder / ".cache/huggingface/download/model_index.json.metadata"
            meta.parent.mkdir(parents=True)  # what `hf download --local-dir` leaves: timestamps
            meta.write_text(f"{repo}\n{time.time()}\n")
    elif "dvc import-url" in text:
        [command] = block
        url = command.split()[2]
        run_block(root, [command.replace(url, str(downloads / "inception.pth"))])
    else:
        raise AssertionError(f"no stand-in for {block}")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """FashionGen-layout files named as FashionGen's, tiny base folders laid out as
    kandinsky-community's two repositories (random weights of the stand-in's classes, the
    params' clip_image_size), and a random Inception-v3 weights file."""
    from fashiondiff.standin.synthetic import GENERIC, write_synthetic
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    out = tmp_path_factory.mktemp("downloads")
    # 40 products: data.holdout_fraction=0.1 holds a few of them out (the products' hashes decide)
    write_synthetic(out / "fashiongen_256_256_validation.h5", n_products=40, poses_per_product=2, seed=5)
    write_synthetic(
        out / "fashiongen_256_256_train.h5", n_products=4, poses_per_product=2, seed=6, first_product_id=200_000
    )
    coco_like(
        out / "coco", write_synthetic(out / "generic.h5", n_products=6, poses_per_product=1, seed=7, domain=GENERIC)
    )
    captions = [f"{c} {w}" for c in ("black", "red", "blue", "white") for w in ("dress", "shirt", "mug", "chair")]
    save_pipelines(build_tiny(captions, TinySpec(clip_image_size=224), seed=0), out / "base")
    random_inception_weights(out / "inception.pth")
    return out


def coco_like(root: Path, h5: Path) -> None:
    """val2017/*.jpg and annotations/captions_val2017.json, laid out as COCO's zips unpack, from
    a generic-domain file's pictures and names (two captions per picture, as COCO has five)."""
    from PIL import Image

    from fashiondiff.data.fashiongen import read_rows

    rows = read_rows(h5, 0, 6)
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, notes = [], []
    for i, (pixels, name) in enumerate(zip(rows.images, rows.text["name"])):
        file = f"{i + 1:012d}.jpg"
        Image.fromarray(pixels).resize((320, 240)).save(root / "val2017" / file, quality=90)
        images.append({"id": i + 1, "file_name": file, "width": 320, "height": 240})
        notes += [{"id": 10 * i + k, "image_id": i + 1, "caption": f"{name}{' on a floor' * k}"} for k in (1, 2)]
    (root / "annotations/captions_val2017.json").write_text(json.dumps({"images": images, "annotations": notes}))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh clone-like copy (tracked files), SMALL params, one commit, a `.venv` link."""
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    sh(root, "git", "config", "user.email", "t@t")
    sh(root, "git", "config", "user.name", "t")
    return root


# The one change to the run: the preset's 1,000 prompts per domain (the paper's setting) are
# 4,000 sampled images and an Inception pass over them, 18 minutes of this machine's CPU, for no
# more plumbing than 3 prompts exercise. The preset must still say 1,000.
PRESET = REPO / "presets/paper.yaml"
PAPER_PROMPTS, TEST_PROMPTS = "evaluate.num_prompts: 1000", f"evaluate.num_prompts: {SMALL['evaluate']['num_prompts']}"
COMMAND = ["fashiondiff run paper --dry", "fashiondiff run paper"]  # README.md's and the page's opening block


@pytest.fixture(scope="module")
def ran(clone, downloads) -> dict[str, str]:
    """The page, block by block; output per runnable command (keyed as the page writes it)."""
    blocks = marked_blocks(PAGE)
    assert [m for m, _ in blocks].count(DOWNLOAD) == 3, blocks
    preset = clone / "presets/paper.yaml"
    assert preset.read_text().count(PAPER_PROMPTS) == 1, "the preset's prompt count changed"
    preset.write_text(preset.read_text().replace(PAPER_PROMPTS, TEST_PROMPTS))
    outputs = {}
    for mark, commands in blocks:
        if mark == DOWNLOAD:
            stand_in_for(commands, clone, downloads)
        else:
            outputs.update(zip(commands, run_block(clone, commands).values()))
    return outputs


def opening_block(page: Path) -> list[str]:
    """The first ```bash block after a page's paper heading (README) or title (the page)."""
    text = page.read_text()
    if page.name == "README.md":
        text = text.split("\n## The paper's run", 1)[1]
    body = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in body.splitlines() if line.strip()]


def test_the_readme_and_the_page_give_the_same_command_and_the_page_runs_it():
    readme, page = opening_block(REPO / "README.md"), opening_block(PAGE)
    assert readme == page == COMMAND
    readme_text = (REPO / "README.md").read_text().split("\n## The paper's run", 1)[1].split("\n## ", 1)[0]
    page_text = PAGE.read_text().split("## 1.", 1)[0]

    def first_block(text: str) -> str:
        return text.split("```bash\n", 1)[1].split("```", 1)[0]

    assert first_block(readme_text) == first_block(page_text)
    runnable = [c for mark, commands in marked_blocks(PAGE) if mark != DOWNLOAD for c in commands]
    assert all(c in runnable for c in COMMAND), runnable


def test_the_inputs_are_under_dvc_and_git_has_only_their_dvc_files(ran, clone):
    tracked = sh(clone, "git", "ls-files").split()
    assert {
        "data/raw.dvc",
        "models/kandinsky-2-1-prior.dvc",
        "models/kandinsky-2-1.dvc",
        "weights/inception/weights-inception-2015-12-05-6726825d.pth.dvc",
    } <= set(tracked)
    downloads = ("data/raw/", "models/kandinsky-2-1-prior/", "models/kandinsky-2-1/")
    assert not [f for f in tracked if f.startswith(downloads)]
    prior = yaml.safe_load((clone / "models/kandinsky-2-1-prior.dvc").read_text())["outs"][0]
    files = [p for p in (clone / "models/kandinsky-2-1-prior").rglob("*") if p.is_file() and ".cache" not in p.parts]
    assert prior["nfiles"] == len(files)  # hf's bookkeeping (.cache/huggingface) is not hashed


def test_the_dry_run_plans_and_lists_the_real_stages_only(ran, clone):
    dry = ran["fashiondiff run paper --dry"]
    listed = {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}
    assert listed == REAL_STAGES, dry
    assert "$ dvc exp run -n paper --dry --force -S data.files.train=data/raw/fashiongen_256_256_validation.h5" in dry
    steps = re.search(r"^steps: ([\d,]+) per model \((\d+) epochs x ([\d,]+) steps of (\d+): one process\)$", dry, re.M)
    assert steps and int(steps[1].replace(",", "")) == int(steps[2]) * int(steps[3].replace(",", "")), dry
    assert "hours, extrapolated (if the models are Kandinsky 2.1 at 256 px)" in dry
    assert "left out: data loading, checkpoints, validation, embed, evaluate" in dry
    assert re.search(r"^  checkpoints/decoder +[\d.]+ MB  3 checkpoints of [\d.]+ M parameters$", dry, re.M), dry
    assert re.search(r"^  total +[\d.]+ [MG]B  against [\d.]+ GB free at ", dry, re.M), dry


def test_the_run_trains_evaluates_with_fid_and_tracks_it(ran, clone):
    run = ran["fashiondiff run paper"]
    ran_stages = {line.split("'")[1] for line in run.splitlines() if line.startswith("Running stage")}
    assert ran_stages == REAL_STAGES, run
    # the generic domain is COCO-like pictures through `fashiondiff convert`, measured by evaluate
    assert json.loads((clone / "reports/metrics.json").read_text()).keys() == {"catalogue", "generic"}
    scores = json.loads((clone / "reports/scores.json").read_text())
    assert "fid" in scores["catalogue"] and scores["catalogue"]["fid_n_generated"] > 0
    details = json.loads((clone / "reports/evaluation.json").read_text())
    assert details["catalogue"]["prompts"] > 0 and details["fid_status"].startswith("computed"), details
    assert "paper" in sh(clone, str(DVC), "exp", "show", "--no-pager", "--csv")

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{clone / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fashiongen-kandinsky")
    [parent] = client.search_runs([exp.experiment_id], filter_string="tags.`fashiondiff.role` = 'pipeline'")
    assert parent.info.run_name == "paper" and parent.data.params["model.prior"] == "models/kandinsky-2-1-prior"
    assert parent.data.params["data.files.generic"] == "data/raw/generic.h5"
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert {c.info.run_name for c in children} == {"train_prior", "train_decoder", "evaluate", "register"}
    assert "evaluate.catalogue.fid" in parent.data.metrics


def test_an_edit_to_the_stand_in_stales_no_real_stage(ran, clone):
    """With every input the user's, the stand-in's code is no input of a real stage."""
    synthetic = clone / "src/fashiondiff/standin/synthetic.py"
    synthetic.write_text(synthetic.read_text() + "\n# an edit to the stand-in\n")
    stale = stale_stages(clone)
    assert all(s.startswith("standin/dvc.yaml:") or s == "register" for s in stale), stale  # register: always


def shop_folder(root: Path, catalogue: Path) -> Path:
    """A shop's export no test has seen: photos of a FashionGen-layout file's products saved as a
    phone and a web shop would (a big JPEG, a PNG with transparency, a grey one), two photos per
    product, and the faults of a real export in its captions.csv: a file that is missing, a
    corrupt one, an empty caption, a file listed twice."""
    import csv

    from PIL import Image

    from fashiondiff.data.fashiongen import read_rows

    rows = read_rows(catalogue, 0, 80)
    photos = root / "photos"
    photos.mkdir(parents=True)
    lines = [("file", "caption", "product_id")]
    for i, (pixels, name, product) in enumerate(zip(rows.images, rows.text["name"], rows.product_ids)):
        image = Image.fromarray(pixels)
        kind = i % 3
        if kind == 0:
            file = f"p{i:03d}.jpg"
            image.resize((900, 900)).save(photos / file, quality=92)
        elif kind == 1:
            file = f"p{i:03d}.png"
            image.convert("RGBA").resize((300, 400)).save(photos / file)
        else:
            file = f"p{i:03d}.png"
            image.convert("L").save(photos / file)
        lines.append((file, name, str(int(product))))
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 not a picture")
    Image.fromarray(rows.images[0]).save(photos / "uncaptioned.png")
    lines += [
        ("gone.jpg", "Black boots", "1"),
        ("corrupt.jpg", "Red scarf", "2"),
        ("uncaptioned.png", "", "3"),
        ("p000.jpg", "Again", "4"),
    ]
    with (root / "captions.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(lines)
    return root


def test_a_shop_catalogue_runs_end_to_end_without_a_generic_file(ran, clone, downloads, tmp_path):
    """The issue's check: a folder no test has seen through `fashiondiff convert` (the right rows
    in, each bad one named by its line), then `fashiondiff run` with it as the catalogue and no
    generic file: extraction, training and an evaluation of the catalogue alone."""
    shop = shop_folder(tmp_path / "shop", downloads / "fashiongen_256_256_validation.h5")
    out = run_block(
        clone,
        [f"fashiondiff convert --images {shop / 'photos'} --captions {shop / 'captions.csv'} --out data/raw/shop.h5"],
    )
    [report] = out.values()
    for line, reason in (
        (82, "missing file gone.jpg"),
        (83, "unreadable image corrupt.jpg"),
        (84, "empty caption"),
        (85, "duplicate file p000.jpg (first at line 2)"),
    ):
        assert f"captions.csv line {line}: {reason}" in report, report
    assert re.search(r"wrote data/raw/shop\.h5: 80 rows, \d+ products, 4 rows skipped", report), report

    (clone / "presets/shop.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "shop",
                "params": {
                    "data.files.train": "data/raw/shop.h5",
                    "data.files.validation": "data/raw/shop.h5",
                    "data.files.generic": None,
                    "data.holdout_fraction": 0.25,
                },
            }
        )
    )
    run = run_block(clone, ["dvc add data/raw", "fashiondiff run shop"])["fashiondiff run shop"]
    ran_stages = {line.split("'")[1] for line in run.splitlines() if line.startswith("Running stage")}
    assert ran_stages == REAL_STAGES - {"extract@generic"}, run
    assert "the generic domain (what fine-tuning keeps of what the base drew) is skipped" in run
    assert "generic" not in yaml.safe_load((clone / "params.yaml").read_text())["data"]["files"]
    metrics = json.loads((clone / "reports/metrics.json").read_text())
    assert set(metrics) == {"catalogue"} and metrics["catalogue"]["tuned"]["clip_score"] > 0
    captions = pd_captions(clone / "data/extracted/train")
    assert len(captions) == 80 and "Again" not in set(captions["caption"])


def pd_captions(folder: Path):
    import pandas as pd

    return pd.read_parquet(folder / "captions.parquet")
