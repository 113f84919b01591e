"""One process's share of evaluate's scores: kept small, handed to process 0, merged there.

Usage::

    tally = Tally()
    tally.add_prompts(clip.encode_images(images), numbers, held)   # per prompt: CLIP score, R hit
    tally.stats.update(embeds)                                       # running mean/cov for fd_clip
    whole = Tally.merged([tally_of_process_0, tally_of_process_1])
    whole.mean("clip")                                               # in prompt order: as one process

A tally holds, for one set of images of one domain (a model's samples, or the real photos):
each prompt's CLIP score and R-precision hit, by prompt number (a few bytes per image: the
merge puts them back in prompt order, so their means are the ones one process computes, bit
for bit); the running mean and covariance of the CLIP image embeddings (O(d^2), fd_clip); and
the FID's running sums of that side, one part per process (O(2048^2) each). Nothing in it grows
with the images but the per-prompt numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fashiondiff.evaluate.clip import clip_score
from fashiondiff.evaluate.metrics import GaussianStats, r_precision


@dataclass
class Tally:
    numbers: list[np.ndarray] = field(default_factory=list)  # prompt numbers, batch by batch
    clip: list[np.ndarray] = field(default_factory=list)  # their CLIP scores
    hits: list[np.ndarray] = field(default_factory=list)  # their R-precision hits (1, 0, or a tie's share)
    fidelity: list[np.ndarray] = field(default_factory=list)  # edits: each one's CLIP-I to its photo
    stats: GaussianStats = field(default_factory=GaussianStats)  # CLIP image embeddings
    fid_parts: list[dict] = field(default_factory=list)  # FID states of this side, one per process

    def add_prompts(self, embeds: np.ndarray, numbers, held) -> None:
        """Score the images of prompts ``numbers`` (rows of ``embeds``) one by one: each value is
        what ``clip_score`` / ``r_precision`` give for that image alone, so the mean over all
        prompts is the same whichever process scored which."""
        numbers = np.asarray(list(numbers), dtype=np.int64)
        self.numbers.append(numbers)
        self.clip.append(
            np.array([clip_score(embeds[j : j + 1], held.text_embeds[held.own[[i]]]) for j, i in enumerate(numbers)])
        )
        self.hits.append(
            np.array(
                [r_precision(embeds[j : j + 1], held.text_embeds, held.candidates[[i]]) for j, i in enumerate(numbers)]
            )
        )

    def add_pairs(self, numbers, clip: np.ndarray, fidelity: np.ndarray) -> None:
        """Edits ``numbers``: each one's alignment to its prompt and fidelity to its photo."""
        self.numbers.append(np.asarray(list(numbers), dtype=np.int64))
        self.clip.append(np.asarray(clip, dtype=np.float64))
        self.fidelity.append(np.asarray(fidelity, dtype=np.float64))

    def mean(self, name: str) -> float:
        """The mean of ``clip``, ``hits`` or ``fidelity`` over every prompt, taken in prompt order."""
        numbers = np.concatenate(self.numbers)
        if not np.array_equal(np.sort(numbers), np.arange(len(numbers))):
            raise RuntimeError(
                f"evaluate: scores of prompts {sorted(set(range(len(numbers))) - set(numbers))[:5]}"
                " are missing or doubled"
            )  # a bug in the sharing out, never the user's
        values = np.concatenate(getattr(self, name))
        return float(np.mean(values[np.argsort(numbers, kind="stable")]))

    @classmethod
    def merged(cls, parts: list[Tally | None]) -> Tally:
        """The processes' tallies of one image set, in process order (statistics merged in that
        order: only their float64 round-off depends on the number of processes)."""
        out = cls()
        for part in parts:
            if part is None:
                continue
            out.numbers += part.numbers
            out.clip += part.clip
            out.hits += part.hits
            out.fidelity += part.fidelity
            out.stats.merge(part.stats)
            out.fid_parts += part.fid_parts
        return out
