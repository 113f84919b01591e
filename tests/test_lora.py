"""LoRA fine-tuning: params, the adapter the stages write (diffusers' PEFT format), the
merged pipeline folder beside it, MLflow, and `generate --lora`. Stages run as processes
on the tiny models, as under `dvc repro`; the kill -9 resume test is in test_train.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import replaced, repo_params
from PIL import Image
from pipeline_fixtures import run_stage, stage_params
from safetensors.torch import load_file

from fashiondiff.errors import PipelineError
from fashiondiff.models.adapter import ADAPTER_FILE, load_adapter
from fashiondiff.processes import project_env
from fashiondiff.train.lora import add_lora
from fashiondiff.train.run import fingerprint

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy")

# Base model + unmerged adapter against the merged folder, fp32 on the CPU: the two differ
# only by float rounding (W x + s B(A x) against (W + s B A) x): measured <= 1e-6 on
# outputs of magnitude ~2, while a random rank-4 adapter (B ~ N(0, 0.01)) moves them by 3e-3..2e-2.
ATOL, RTOL = 1e-5, 1e-4
LORA = {"prior.lora_rank": 4, "decoder.lora_rank": 4, "lr": 0.005}  # a larger rate: a visible change


def stage_args(root: Path, kind: str, cache: Path) -> list:
    return [
        "--cache",
        cache,
        "--out",
        root / f"models/{kind}",
        "--checkpoints",
        root / f"ckpt/{kind}",
        "--summary",
        root / f"{kind}.json",
        "--plot",
        root / f"{kind}.csv",
    ]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_base, train_cache) -> Path:
    """Both stages trained with LoRA: the decoder under bf16 autocast with accumulation and
    clipping, the prior with MLflow tracking on (sqlite under the run). Two stage processes
    (~20 s): every test that uses it is marked slow."""
    root = tmp_path_factory.mktemp("lora_run")
    params = stage_params(tiny_base, **LORA, **{"mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db"})
    decoder = stage_params(
        tiny_base,
        **LORA,
        **{"train.mixed_precision": "bf16", "train.max_grad_norm": 0.5, "train.gradient_accumulation_steps": 2},
    )
    run_stage(root, decoder, "train_decoder.py", *stage_args(root, "decoder", train_cache))
    run_stage(root, params, "train_prior.py", *stage_args(root, "prior", train_cache), FASHIONDIFF_TRACKING="on")
    return root


# --- params -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_lora_and_a_trainable_subset_are_one_choice(kind):
    with pytest.raises(PipelineError, match=rf"^params: {kind}\.lora_rank > 0 .* {kind}\.trainable must be all"):
        repo_params(**{f"{kind}.lora_rank": 4, f"{kind}.trainable": "proj_in"})
    assert repo_params(**{f"{kind}.lora_rank": 4}).__getattribute__(kind).lora_rank == 4
    assert repo_params(**{f"{kind}.trainable": "proj_in"}).__getattribute__(kind).lora_rank == 0


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("prior.lora_rank", -1, "must be >= 0"),
        ("decoder.lora_alpha", 0, "must be > 0"),
        ("prior.lora_dropout", 1.0, r"must be in \[0, 1\)"),
        ("decoder.lora_targets", " , ", "must name at least one module"),
        ("prior.lora_rank", 2.5, "must be an integer"),
    ],
)
def test_bad_lora_params_fail_at_load_naming_the_key(key, value, message):
    with pytest.raises(PipelineError, match=rf"params: {key} {message}"):
        repo_params(**{key: value})


def test_checkpoint_fingerprint_covers_the_lora_params():
    params = repo_params()
    base = fingerprint("decoder", params, {"fingerprint": "cache"})
    for change in ({"lora_rank": 4}, {"lora_alpha": 8.0}, {"lora_dropout": 0.1}, {"lora_targets": "to_q"}):
        changed = replaced(params, decoder=replaced(params.decoder, **change))
        assert fingerprint("decoder", changed, {"fingerprint": "cache"}) != base, change


# --- preparing the model --------------------------------------------------------------------


def _load(tiny_base: Path, kind: str):
    from diffusers import PriorTransformer, UNet2DConditionModel

    if kind == "prior":
        return PriorTransformer.from_pretrained(tiny_base / "prior/prior")
    return UNet2DConditionModel.from_pretrained(tiny_base / "decoder/unet")


@pytest.mark.parametrize("kind, per_block", [("prior", 4), ("decoder", 6)])
def test_default_targets_adapt_every_attention_and_freeze_the_base(tiny_base, kind, per_block):
    model = _load(tiny_base, kind)
    section = getattr(repo_params(**{f"{kind}.lora_rank": 4}), kind)
    count = add_lora(model, section, kind)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    attentions = {n for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    assert {a.rsplit(".", 2 if a.endswith(".0") else 1)[0] for a in adapted} == attentions
    assert len(adapted) == per_block * len(attentions)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_targets_that_match_nothing_name_the_key(tiny_base):
    section = replaced(repo_params().prior, lora_rank=4, lora_targets="no_such_proj")
    with pytest.raises(PipelineError, match=r"params: prior\.lora_targets='no_such_proj' matches no module"):
        add_lora(_load(tiny_base, "prior"), section, "prior")


# --- what the stages write --------------------------------------------------------------------


def _inputs(model, kind: str) -> dict:
    g = torch.Generator().manual_seed(0)
    c = model.config
    if kind == "prior":
        d = c.embedding_dim
        return dict(
            hidden_states=torch.randn(2, d, generator=g),
            timestep=torch.tensor([10, 500]),
            proj_embedding=torch.randn(2, d, generator=g),
            encoder_hidden_states=torch.randn(2, c.num_embeddings, d, generator=g),
            attention_mask=torch.ones(2, c.num_embeddings, dtype=torch.bool),
        )
    return dict(
        sample=torch.randn(2, c.in_channels, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 77, c.encoder_hid_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(2, c.cross_attention_dim, generator=g),
            "image_embeds": torch.randn(2, c.cross_attention_dim, generator=g),
        },
    )


@torch.no_grad()
def _output(model, kind: str) -> torch.Tensor:
    out = model(**_inputs(model, kind))
    return out.predicted_image_embedding if kind == "prior" else out.sample


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_adapter_on_the_base_equals_the_merged_folder(lora_run, tiny_base, kind):
    from diffusers import KandinskyPipeline, KandinskyPriorPipeline

    adapter = lora_run / f"models/{kind}/lora"
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_FILE]
    keys = load_file(adapter / ADAPTER_FILE).keys()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    # The merged pipeline folder loads in plain diffusers despite its extra lora/ subfolder.
    cls, part = (KandinskyPriorPipeline, "prior") if kind == "prior" else (KandinskyPipeline, "unet")
    merged = getattr(cls.from_pretrained(lora_run / f"models/{kind}", use_safetensors=True), part)
    assert not any("lora" in n for n in merged.state_dict())

    base = getattr(cls.from_pretrained(tiny_base / kind, use_safetensors=True), part)
    before = _output(base, kind)
    # The call the README gives (load_adapter checks it loaded every tensor of the file).
    base.load_lora_adapter(str(adapter), use_safetensors=True, prefix=None)
    with_adapter = _output(base, kind)
    assert (with_adapter - before).abs().max() > 100 * ATOL, "the adapter changes the output"
    torch.testing.assert_close(with_adapter, _output(merged, kind), atol=ATOL, rtol=RTOL)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")  # the wrong-model case
def test_loading_the_adapter_the_default_way_loads_nothing_and_ours_says_so(lora_run, tiny_base):
    adapter = lora_run / "models/prior/lora"
    base = _load(tiny_base, "prior")
    base.load_lora_adapter(str(adapter), use_safetensors=True)  # prefix="transformer": no key kept
    assert not getattr(base, "peft_config", None)
    with pytest.raises(PipelineError, match="no LoRA adapter here"):
        load_adapter(base, lora_run / "models/prior", "--prior-lora")
    with pytest.raises(PipelineError, match="cannot apply this LoRA adapter"):
        load_adapter(_load(tiny_base, "prior"), lora_run / "models/decoder/lora", "--prior-lora")


@pytest.mark.slow
def test_adapter_is_an_artefact_of_its_training_run(lora_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{lora_run}/mlflow.db")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="attributes.run_name = 'train_prior'"
    )
    assert len(runs) == 1
    files = [a.path for a in client.list_artifacts(runs[0].info.run_id, "lora")]
    assert files == [f"lora/{ADAPTER_FILE}"]


# --- generate --lora --------------------------------------------------------------------------

FAST = ["--steps", "2", "--prior-steps", "2", "--height", "64", "--width", "64", "--seed", "1"]


def _generate(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fashiondiff", "generate", "a red dress", *args, *FAST],
        cwd=cwd,
        env=project_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_generate_applies_adapters_to_the_base_model(lora_run, tiny_base):
    runs = {  # started together: each spends most of its time importing torch
        "base": _generate(lora_run, "--model", str(tiny_base), "--out", "base.png"),
        "lora": _generate(lora_run, "--model", str(tiny_base), "--lora", "models", "--out", "lora.png"),
        "merged": _generate(lora_run, "--model", "models", "--out", "merged.png"),
    }
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (name, stderr)
    image = {name: np.asarray(Image.open(lora_run / f"{name}.png"), dtype=np.int16) for name in runs}
    assert np.abs(image["lora"] - image["base"]).max() > 8, "the adapters change the image"
    assert np.abs(image["lora"] - image["merged"]).max() <= 1  # the same model, up to rounding


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "models", "--lora", "models"], "has the adapter models/prior/lora merged already"),
        (["--lora", "ckpt"], "no prior/lora/pytorch_lora_weights.safetensors"),
        (["--prior-lora", "models/prior"], "no LoRA adapter here"),
    ],
)
def test_generate_lora_errors(lora_run, tiny_base, args, expected):
    model = [] if "--model" in args else ["--model", str(tiny_base)]
    process = _generate(lora_run, *model, *args, "--out", "never.png")
    _, stderr = process.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert process.returncode == 1 and len(lines) == 1 and expected in lines[0], stderr
    assert not (lora_run / "never.png").exists()
