"""Which prior, decoder and LoRA adapters to load, from a command's flags (``generate``, ``serve``).

Usage::

    prior, decoder = resolve_models("models", None, None)          # models/prior, models/decoder
    prior_lora, decoder_lora = resolve_adapters("models", None, None, "models/base/prior", ...)

Each names the flag at fault in its one-line error. No stage imports this module.
"""

from __future__ import annotations

from pathlib import Path

from fashiondiff.errors import PipelineError


def resolve_models(model: str | None, prior: str | None, decoder: str | None) -> tuple[str, str]:
    """The prior and decoder to load: explicit ids/folders win over ``--model``'s subfolders."""
    from fashiondiff.models.loader import resolve

    if (prior is None or decoder is None) and not Path(model).is_dir():
        raise PipelineError(f"{model}: no such model folder (--model: a folder with prior/ and decoder/)")
    prior = prior or str(Path(model) / "prior")
    decoder = decoder or str(Path(model) / "decoder")
    resolve(prior, "--prior")
    resolve(decoder, "--decoder")
    return prior, decoder


def resolve_adapters(
    lora: str | None, prior_lora: str | None, decoder_lora: str | None, prior: str, decoder: str
) -> tuple[str | None, str | None]:
    """The adapter folders to apply: explicit ``--prior-lora``/``--decoder-lora`` win over
    ``--lora``'s ``prior/lora`` and ``decoder/lora``. Each must hold an adapter, and must not
    sit inside the model folder it would be applied to (that folder has it merged already)."""
    if lora is None and prior_lora is None and decoder_lora is None:
        return None, None
    from fashiondiff.models.adapter import ADAPTER_DIR, ADAPTER_FILE

    if lora is not None:
        if not Path(lora).is_dir():
            raise PipelineError(f"{lora}: no such folder (--lora: a folder with prior/lora/ and/or decoder/lora/)")
        found = {kind: Path(lora) / kind / ADAPTER_DIR for kind in ("prior", "decoder")}
        found = {kind: str(path) for kind, path in found.items() if (path / ADAPTER_FILE).is_file()}
        if not found:
            raise PipelineError(f"{lora}: no prior/lora/{ADAPTER_FILE} or decoder/lora/{ADAPTER_FILE} (--lora)")
        prior_lora = prior_lora or found.get("prior")
        decoder_lora = decoder_lora or found.get("decoder")
    for adapter, model, flag, model_flag in (
        (prior_lora, prior, "--prior-lora", "--prior"),
        (decoder_lora, decoder, "--decoder-lora", "--decoder"),
    ):
        if adapter is None:
            continue
        if not (Path(adapter) / ADAPTER_FILE).is_file():
            raise PipelineError(f"{adapter}: no LoRA adapter here (no {ADAPTER_FILE}) ({flag})")
        if Path(adapter).resolve().parent == Path(model).resolve():
            raise PipelineError(
                f"{model} has the adapter {adapter} merged already: apply it to the base "
                f"model instead ({model_flag} or --model, e.g. --model models/base)"
            )
    return prior_lora, decoder_lora
