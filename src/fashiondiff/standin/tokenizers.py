"""Deterministic training of the tiny model's two tokenizers (CLIP's BPE, XLM-R's Unigram).

The `tokenizers` trainers are not reproducible: BPE breaks ties between equally frequent
pairs in a per-process hash order (two runs swapped the merges ``e t</w>`` and
``e r</w>``), and the Unigram trainer's parallel float sums differ in the 16th digit. A
swapped merge changes how text splits, and the whole pipeline after it. These trainers
are small, single-threaded and order everything explicitly, so the same captions always
give byte-identical tokenizer files. They use each tokenizer's own normaliser and
pre-tokeniser, so the vocabulary matches how the tokenizer will split text. Usage::

    clip_tokenizer = train_clip_bpe(captions, vocab_size=1000)
    xlmr_tokenizer = train_xlmr_unigram(captions, vocab_size=1000)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer, XLMRobertaTokenizer

END_OF_WORD = "</w>"  # CLIP's BPE marks the last symbol of a word
MIN_PAIR_COUNT = 2  # a merge must be seen twice: singletons would memorise whole captions
SCORE_DIGITS = 6  # Unigram log-probabilities are rounded: no float noise in the files


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_words(tokenizer: CLIPTokenizer, texts: Iterable[str]) -> Counter:
    """Word counts as CLIP's own normaliser and pre-tokeniser see them (lowercased, bytes)."""
    backend = tokenizer.backend_tokenizer
    words: Counter = Counter()
    for text in texts:
        normal = backend.normalizer.normalize_str(text)
        words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normal))
    return words


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_clip_bpe(texts: Iterable[str], vocab_size: int, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose merges are learnt from ``texts``: most frequent pair first, ties
    broken by the pair's text, until ``vocab_size`` or no pair is seen ``MIN_PAIR_COUNT`` times."""
    probe = CLIPTokenizer()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    alphabet = _byte_alphabet()
    vocab = alphabet + [a + END_OF_WORD for a in alphabet]
    words = {tuple(w[:-1]) + (w[-1] + END_OF_WORD,): n for w, n in _clip_words(probe, texts).items()}
    merges: list[tuple[str, str]] = []
    while len(vocab) + len(specials) < vocab_size:
        pairs: Counter = Counter()
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < MIN_PAIR_COUNT:
            break
        merges.append(best)
        vocab.append(best[0] + best[1])
        words = {_merge(symbols, best): n for symbols, n in words.items()}
    ids = {token: i for i, token in enumerate(vocab + specials)}
    tokenizer = CLIPTokenizer(vocab=ids, merges=merges)
    tokenizer.model_max_length = max_length
    return tokenizer


_PIECES = re.compile(r"▁?[^\W_]+|[^\w\s▁]|_")


def train_xlmr_unigram(texts: Iterable[str], vocab_size: int, max_length: int = 77) -> XLMRobertaTokenizer:
    """An XLMRobertaTokenizer (Unigram, cased) over ``texts``: every character, then whole
    words and their letter runs by frequency, scored by rounded log-probability."""
    probe = XLMRobertaTokenizer()
    pre = probe.backend_tokenizer.pre_tokenizer
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    chars: Counter = Counter()
    pieces: Counter = Counter()
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            chars.update(word)
            pieces[word] += 1
            pieces.update(p for p in _PIECES.findall(word) if p != word and len(p) > 1)
    total = sum(chars.values()) + sum(pieces.values())

    def score(count: int) -> float:
        return round(math.log(count / total), SCORE_DIGITS)

    floor = score(1) - 10.0  # characters are the fall-back: any word beats spelling it out
    room = max(0, vocab_size - len(specials) - 1 - len(chars))
    words = sorted((p for p in pieces if len(p) > 1 and p not in chars), key=lambda p: (-pieces[p], p))[:room]
    vocab = [(s, 0.0) for s in specials]
    vocab += sorted(((w, score(pieces[w])) for w in words), key=lambda x: (-x[1], x[0]))
    vocab += sorted(((c, round(floor + score(n), SCORE_DIGITS)) for c, n in chars.items()), key=lambda x: (-x[1], x[0]))
    vocab.append(("<mask>", 0.0))
    tokenizer = XLMRobertaTokenizer(vocab=vocab)
    tokenizer.model_max_length = max_length
    return tokenizer
