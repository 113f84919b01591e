"""Kandinsky 2.1 at its published size with random weights, saved as the two diffusers
folders of ``kandinsky-community/kandinsky-2-1-prior`` and ``kandinsky-community/kandinsky-2-1``.

Usage (bench/fullsize.py)::

    save_full_pipelines(captions, "work/base")   # -> work/base/prior, work/base/decoder

Networks come from ``fashiondiff.models.published`` (the published configs), built and saved one at a
time so that the peak memory is one network (the 1.2 B U-Net: 4.9 GB in float32). The
tokenizers cannot be downloaded: they are this package's deterministic CLIP BPE and XLM-R
Unigram trainers run on the captions, then filled with unused placeholder entries up to the
real vocabulary sizes (49,408 and 250,002) with the special tokens at the real ids
(CLIP ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407; XLM-R ``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, ``<unk>`` 3, ``<mask>`` 250001), so embedding tables and token ids have their
real shapes and ranges. Text splits differently from the real vocabularies.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Iterable
from pathlib import Path

import torch

from fashiondiff.cache.format import TEXT_LENGTH
from fashiondiff.models.published import CLIP_TEXT, DECODER_INDEX, MCLIP, PRIOR_INDEX
from fashiondiff.standin.tiny import decoder_scheduler, prior_scheduler
from fashiondiff.standin.tokenizers import train_clip_bpe, train_xlmr_unigram

CLIP_VOCAB = CLIP_TEXT["vocab_size"]
XLMR_VOCAB = MCLIP["vocab_size"]


def clip_tokenizer(texts: list[str]):
    """CLIP BPE learnt on ``texts``, padded with unused tokens to CLIP's 49,408 entries."""
    from transformers import CLIPTokenizer

    learnt = json.loads(train_clip_bpe(texts, CLIP_VOCAB, TEXT_LENGTH).backend_tokenizer.to_str())["model"]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = [t for t, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab += [f"<|unused{i}|>" for i in range(CLIP_VOCAB - len(specials) - len(vocab))]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab + specials)}, merges=merges)
    tok.model_max_length = TEXT_LENGTH
    assert len(tok) == CLIP_VOCAB and tok.eos_token_id == CLIP_VOCAB - 1
    return tok


def xlmr_tokenizer(texts: list[str]):
    """XLM-R Unigram learnt on ``texts``, padded with unused pieces to 250,002 entries."""
    from transformers import XLMRobertaTokenizer

    learnt = json.loads(train_xlmr_unigram(texts, 10_000, TEXT_LENGTH).backend_tokenizer.to_str())["model"]
    vocab = [tuple(v) for v in learnt["vocab"] if v[0] != "<mask>"]
    floor = min(score for _, score in vocab) - 10.0
    vocab += [(f"<unused{i}>", floor) for i in range(XLMR_VOCAB - 1 - len(vocab))]
    tok = XLMRobertaTokenizer(vocab=vocab + [("<mask>", 0.0)])
    tok.model_max_length = TEXT_LENGTH
    assert len(tok) == XLMR_VOCAB and tok.pad_token_id == 1
    return tok


def _save(module, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


def _index(folder: Path, index: dict) -> None:
    import diffusers

    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": index["_class_name"],
                "_diffusers_version": diffusers.__version__,
                **{k: v for k, v in sorted(index.items()) if k != "_class_name"},
            },
            indent=2,
        )
        + "\n"
    )


def save_full_pipelines(texts: Iterable[str], out_dir: str | Path, seed: int = 0) -> dict:
    """Write ``out_dir/prior`` and ``out_dir/decoder``; returns parameters per network."""
    from transformers import CLIPImageProcessor

    from fashiondiff.models.published import builders

    torch.manual_seed(seed)
    texts = list(texts)
    prior_dir, decoder_dir = Path(out_dir) / "prior", Path(out_dir) / "decoder"
    clip_tok, xlmr_tok = clip_tokenizer(texts), xlmr_tokenizer(texts)
    build = builders(
        clip_bos_token_id=clip_tok.bos_token_id,
        clip_eos_token_id=clip_tok.eos_token_id,
        clip_pad_token_id=clip_tok.pad_token_id,
    )
    networks = {
        (prior_dir, "text_encoder"): build["clip_text"],
        (prior_dir, "image_encoder"): build["clip_vision"],
        (prior_dir, "prior"): lambda: _prior(build["prior"]()),
        (decoder_dir, "text_encoder"): build["mclip"],
        (decoder_dir, "unet"): build["unet"],
        (decoder_dir, "movq"): build["movq"],
    }
    counts = {}
    for (folder, name), make in networks.items():
        net = make()
        counts[f"{folder.name}/{name}"] = sum(p.numel() for p in net.parameters())
        _save(net, folder / name)
        del net
        gc.collect()
    clip_tok.save_pretrained(prior_dir / "tokenizer")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        prior_dir / "image_processor"
    )
    prior_scheduler().save_pretrained(prior_dir / "scheduler")
    xlmr_tok.save_pretrained(decoder_dir / "tokenizer")
    decoder_scheduler().save_pretrained(decoder_dir / "scheduler")
    _index(prior_dir, PRIOR_INDEX)
    _index(decoder_dir, DECODER_INDEX)
    return counts


def _prior(prior):
    with torch.no_grad():  # a fresh prior has clip_std == 0 (2.1's real statistics are ~1)
        prior.clip_std.fill_(1.0)
    return prior
