"""params.yaml as each stage sees it: only the sections dvc.yaml declares, validated by their own
modules and readable only where declared; and the whole file, validated by every module."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, params_tree, repo_params
from pydantic import ValidationError

from fashiondiff.config.view import SECTIONS, ParamsView, declared_params, stage_params
from fashiondiff.config.whole import load_params, params_from_dict
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


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("evaluate.num_prompts", 1, "evaluate.num_prompts must be >= 2"),
        (
            "diffusion_steps",
            1,
            "diffusion_steps 1 x evaluate.edit_strengths' 0.3 leaves evaluate's img2img no denoising",
        ),
        (
            "evaluate.edit_strengths",
            [0.3, 0.301],
            "evaluate.edit_strengths must list at least one strength, no two equal",
        ),
        ("evaluate.edit_strengths", [0.0], "evaluate.edit_strengths.0 must be in \\(0, 1\\]"),
        ("model.resolution", 60, "model.resolution must be a multiple of 8"),
        ("train.mixed_precision", "fp8", "train.mixed_precision must be no, fp16 or bf16"),
        ("epochs", "many", "epochs must be an integer"),
    ],
)
def test_bad_values_fail_at_load_naming_the_key(key, value, message):
    """The whole file (fashiondiff run's check before a run, tools): every section's errors, named."""
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


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["train"].update(warmup_stepz=3), r"params: unknown key train\.warmup_stepz \(known: adam_beta1, "),
        (lambda t: t.update(decoder=None), r"params: decoder must be a mapping, got NoneType"),
        (
            lambda t: t["decoder"].update(gradient_checkpointing="yes"),
            r"params: decoder\.gradient_checkpointing must be true or false, got 'yes'",
        ),
        (lambda t: t.update(batch_size=32.0), r"params: batch_size must be an integer, got 32\.0"),
        (
            lambda t: t["train"].update(lr_schedule="step"),
            r"params: train\.lr_schedule must be constant_with_warmup, cosine or linear",
        ),
        (
            lambda t: t["prior"].update(lora_rank=4, trainable="blocks"),
            r"params: prior\.lora_rank > 0 trains a LoRA adapter and nothing else, so prior\.trainable must be all",
        ),
        (
            lambda t: t["train"].update(checkpoint_every=3, gradient_accumulation_steps=2),
            r"train\.checkpoint_every must be a multiple of train\.gradient_accumulation_steps",
        ),
    ],
)
def test_pydantic_errors_read_as_one_line_naming_the_key(change, message):
    tree = params_tree()
    change(tree)
    with pytest.raises(PipelineError, match=message):
        params_from_dict(tree)


def test_params_are_read_only():
    with pytest.raises(ValidationError, match="frozen"):
        repo_params().train.warmup_steps = 3
    with pytest.raises(AttributeError, match="params are read-only"):
        view(["train"]).lr = 1.0


def test_a_stage_validates_only_the_sections_it_declares(tmp_path):
    """A bad evaluate key stops evaluate (and the whole-file check), not extract."""
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params_tree(**{"evaluate.num_prompts": 1, "train.warmup_stepz": 3})))
    assert stage_params("extract", bad, REPO).data.chunk_size == 256
    with pytest.raises(PipelineError, match="evaluate.num_prompts must be >= 2"):
        stage_params("evaluate", bad, REPO)
    with pytest.raises(PipelineError, match=r"unknown key train\.warmup_stepz"):
        stage_params("train_prior", bad, REPO)
    missing = params_tree()
    del missing["data"]["caption"]
    bad.write_text(yaml.safe_dump(missing))
    with pytest.raises(PipelineError, match=r"params: missing key data\.caption"):
        stage_params("extract", bad, REPO)


def test_each_key_is_defined_by_the_module_the_registry_names():
    assert list(SECTIONS) == list(yaml.safe_load((REPO / "params.yaml").read_text()))  # the file's order
    for module in set(SECTIONS.values()):
        fields = importlib.import_module(f"fashiondiff.config.{module}").FIELDS
        assert set(fields) == {k for k, m in SECTIONS.items() if m == module}, module


def test_the_loop_reads_only_what_the_train_section_has():
    """train.loop takes a protocol (so the stand-in's pre-training need not import config/train.py);
    params ``train`` must satisfy it."""
    from fashiondiff.config.train import TrainParams
    from fashiondiff.train.loop import LoopSettings

    assert set(LoopSettings.__annotations__) <= set(TrainParams.model_fields)


@pytest.mark.parametrize(
    "stage, modules",
    [
        ("extract", {"data"}),
        ("embed", {"method", "model", "embed", "data", "compute"}),
        ("train_prior", {"method", "model", "embed", "train"}),
        ("evaluate", {"method", "model", "evaluate", "data", "compute"}),
        ("synthesize", {"method", "standin"}),
    ],
)
def test_a_stage_imports_only_its_sections_modules(stage, modules):
    code = (
        "import sys; from fashiondiff.config.view import stage_params; "
        f"stage_params({stage!r}, {str(REPO / 'params.yaml')!r}, {str(REPO)!r}); "
        "print(' '.join(m for m in sys.modules if m.startswith('fashiondiff.config.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {m.rsplit(".", 1)[1] for m in out} == modules | {"schema", "view"}


def test_bare_words_dvc_writes_back_read_as_the_strings_they_are(tmp_path):
    """`dvc exp run -S` rewrites params.yaml without quotes: `mixed_precision: no`, `compile: off`.
    The stages read them as DVC does (YAML 1.2: only true/false are booleans), so the pipeline's
    MLflow parent run shows "no", not False; real booleans stay booleans."""
    from fashiondiff.config.schema import read_params_file

    text = (REPO / "params.yaml").read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    text = text.replace("compile: auto", "compile: off")
    (tmp_path / "params.yaml").write_text(text)
    raw = read_params_file(tmp_path / "params.yaml")
    assert raw["train"]["mixed_precision"] == "no" and raw["train"]["compile"] == "off"
    assert raw["decoder"]["gradient_checkpointing"] is False
    params = load_params(tmp_path / "params.yaml")
    assert params.train.mixed_precision == "no" and params.train.compile == "off"
