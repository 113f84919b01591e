"""params.yaml as each stage sees it: validated whole, readable only where dvc.yaml declares."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, params_tree, repo_params

from fashiondiff.config.schema import params_from_dict
from fashiondiff.config.view import ParamsView, declared_params, stage_params
from fashiondiff.errors import PipelineError


def view(declared: list[str]) -> ParamsView:
    return ParamsView(repo_params(), "train_prior", frozenset(declared))


def test_a_declared_section_opens_everything_under_it_and_nothing_else():
    params = view(["lr", "train", "model.prior"])
    assert params.lr == 0.0005 and params.train.warmup_steps == 20 and params.model.prior
    with pytest.raises(PipelineError, match=r"stage train_prior reads params key evaluate, which its params: list"):
        params.evaluate.num_prompts
    with pytest.raises(PipelineError, match=r"params key model\.resolution"):
        params.model.resolution
    with pytest.raises(PipelineError, match=r"params key seed,"):
        params.seed
    assert params.reads == {"lr", "train", "model.prior"}


def test_flat_records_only_declared_keys():
    flat = view(["lr", "train", "model.prior"]).flat()
    assert "lr" in flat and "train.warmup_steps" in flat and "model.prior" in flat
    assert not any(k.startswith(("evaluate", "standin", "model.decoder", "mlflow")) for k in flat)


def test_stage_params_use_the_stages_own_list_in_dvc_yaml():
    assert "prior" in declared_params("train_prior", REPO) and "decoder" not in declared_params("train_prior", REPO)
    assert declared_params("extract", REPO) == ["data.caption", "data.chunk_size", "data.workers"]  # foreach
    assert "standin.synthetic" in declared_params("synthesize", REPO)  # standin/dvc.yaml
    params = stage_params("extract", REPO / "params.yaml", REPO)
    assert params.data.chunk_size == 256
    with pytest.raises(PipelineError, match="params key seed"):
        params.seed
    with pytest.raises(PipelineError, match="stage nosuch: not declared"):
        stage_params("nosuch", REPO / "params.yaml", REPO)


def test_params_yaml_is_the_one_source_a_missing_key_is_named(tmp_path):
    tree = params_tree()
    del tree["train"]["warmup_steps"]
    with pytest.raises(PipelineError, match=r"params: missing key train\.warmup_steps"):
        params_from_dict(tree)


@pytest.mark.parametrize("key, value, message", [
    ("evaluate.num_prompts", 1, "evaluate.num_prompts must be >= 2"),
    ("diffusion_steps", 1, "diffusion_steps 1 x evaluate.edit_strengths' 0.3 leaves evaluate's img2img no denoising"),
    ("evaluate.edit_strengths", [0.3, 0.301], "evaluate.edit_strengths must list at least one strength, no two equal"),
    ("evaluate.edit_strengths", [0.0], "evaluate.edit_strengths.0 must be in \\(0, 1\\]"),
    ("model.resolution", 60, "model.resolution must be a multiple of 8"),
    ("train.mixed_precision", "fp8", "train.mixed_precision must be no, fp16 or bf16"),
    ("epochs", "many", "epochs must be an integer"),
])
def test_bad_values_fail_at_load_naming_the_key(key, value, message):
    """Every stage validates the whole file: a bad evaluate key stops extract, not the end of training."""
    with pytest.raises(PipelineError, match=message):
        repo_params(**{key: value})


def test_yaml_no_reads_back_as_no():
    tree = params_tree()
    tree["train"]["mixed_precision"] = False  # what `dvc exp run -S train.mixed_precision=no` writes
    assert params_from_dict(yaml.safe_load(yaml.safe_dump(tree))).train.mixed_precision == "no"


def test_exponent_floats_dvc_writes_read_back_as_floats():
    """`dvc exp run -S lr=0.00001` writes `lr: 1e-05`, which YAML 1.1 reads as a string."""
    text = (REPO / "params.yaml").read_text().replace("\nlr: 0.0005", "\nlr: 1e-05")
    assert yaml.safe_load(text)["lr"] == "1e-05"  # PyYAML: no dot, no float
    assert params_from_dict(yaml.safe_load(text)).lr == 1e-05
    with pytest.raises(PipelineError, match="lr must be a float"):
        repo_params(lr="fast")


@pytest.mark.parametrize("change, message", [
    (lambda t: t["train"].update(warmup_stepz=3), r"params: unknown key train\.warmup_stepz \(known: adam_beta1, "),
    (lambda t: t.update(decoder=None), r"params: decoder must be a mapping, got NoneType"),
    (lambda t: t["decoder"].update(gradient_checkpointing="yes"),
     r"params: decoder\.gradient_checkpointing must be true or false, got 'yes'"),
    (lambda t: t.update(batch_size=32.0), r"params: batch_size must be an integer, got 32\.0"),
    (lambda t: t["train"].update(lr_schedule="step"),
     r"params: train\.lr_schedule must be constant_with_warmup, cosine or linear"),
    (lambda t: t["prior"].update(lora_rank=4, trainable="blocks"),
     r"params: prior\.lora_rank > 0 trains a LoRA adapter and nothing else, so prior\.trainable must be all"),
    (lambda t: t["train"].update(checkpoint_every=3, gradient_accumulation_steps=2),
     r"train\.checkpoint_every must be a multiple of train\.gradient_accumulation_steps"),
])
def test_pydantic_errors_read_as_one_line_naming_the_key(change, message):
    tree = params_tree()
    change(tree)
    with pytest.raises(PipelineError, match=message):
        params_from_dict(tree)


def test_params_are_read_only():
    with pytest.raises(Exception):
        repo_params().train.warmup_steps = 3
    with pytest.raises(AttributeError, match="params are read-only"):
        view(["train"]).lr = 1.0
