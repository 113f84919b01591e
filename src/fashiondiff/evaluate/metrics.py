"""Evaluation metrics: Fréchet distance and R-precision, in the base model's CLIP space.

Usage::

    fd = frechet_distance_from_features(generated_embeds, real_embeds)
    r = r_precision(image_embeds, text_embeds, r_precision_candidates(own, len(texts), 10, seed))

The CLIP score and its encoder are ``fashiondiff.evaluate.clip``'s; FID is ``fashiondiff.evaluate.fid``'s.

Definitions:

* Fréchet distance (Heusel et al. 2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.
  ``fd_clip`` is this distance in the CLIP image-embedding space (Kynkäänniemi et al.
  2023, "The Role of ImageNet Classes in Fréchet Inception Distance").
* FID (``fashiondiff.evaluate.fid``): torchmetrics' FrechetInceptionDistance over
  torch-fidelity's Inception-v3 (2048-d), TF1-compatible resize; never a substitute:
  without the weights file the metric is absent and the status says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg

from fashiondiff.errors import PipelineError

# --- Fréchet distance -------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``sqrtm(sigma1 @ sigma2)`` is taken with scipy; if it is not finite or has a
    non-negligible imaginary part (singular covariances, e.g. fewer samples than
    dimensions) it is retried with ``eps`` added to both diagonals, as pytorch-fid does.
    Tiny imaginary parts left by round-off are dropped, and a result that round-off
    pushes below zero is reported as 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes differ: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}"
        )
    covmean = _sqrtm_product(sigma1, sigma2)
    if covmean is None:
        offset = np.eye(d) * eps
        covmean = _sqrtm_product(sigma1 + offset, sigma2 + offset)
    if covmean is None:
        raise ValueError("frechet_distance: sqrtm(sigma1 @ sigma2) is not real even with eps on the diagonal")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(value), 0.0)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray | None:
    """Real part of sqrtm(sigma1 @ sigma2), or None if it is not finite / not nearly real."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(root)):
        return None
    if np.iscomplexobj(root):
        scale = max(1.0, float(np.abs(root.real).max(initial=0.0)))
        if np.abs(root.imag).max(initial=0.0) > 1e-3 * scale:
            return None
        root = root.real
    return root


def frechet_distance_from_features(a, b) -> float:
    """Fréchet distance between the Gaussians fitted to rows of ``a`` and rows of ``b``."""
    return frechet_distance(*GaussianStats.of(a).moments(), *GaussianStats.of(b).moments())


class GaussianStats:
    """Running mean and covariance (ddof=1) of feature rows, in float64.

    Batches merge with Chan et al.'s pairwise update, so a whole held-out split streams
    through without keeping its features in memory.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None

    @classmethod
    def of(cls, features) -> GaussianStats:
        stats = cls()
        stats.update(features)
        return stats

    def update(self, features) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"GaussianStats.update: expected (n, d) features, got shape {x.shape}")
        batch = GaussianStats()
        batch.count, batch.mean = x.shape[0], x.mean(axis=0)
        centred = x - batch.mean
        batch._m2 = centred.T @ centred
        self.merge(batch)

    def merge(self, other: GaussianStats) -> None:
        """Add ``other``'s rows (another batch, or another process's share): Chan's update.
        Merging in another order changes the last bits only (float64 round-off)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self._m2 = other.count, other.mean, other._m2
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (self.count * other.count / total)
        self.mean = self.mean + delta * (other.count / total)
        self.count = total

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance); needs at least two rows."""
        if self.count < 2:
            raise PipelineError(f"a covariance needs at least 2 images, got {self.count}")
        return self.mean, self._m2 / (self.count - 1)


# --- CLIP score ---------------------------------------------------------------------------

# --- R-precision ----------------------------------------------------------------------------


def r_precision_candidates(own: Sequence[int], n_texts: int, r: int, seed: int) -> np.ndarray:
    """(n, r) indices into ``n_texts`` distinct captions: row ``i`` is its own caption
    ``own[i]`` (column 0) and ``r - 1`` others drawn without replacement, seeded by ``(seed, i)``.

    R-precision as the text-to-image literature computes it (Xu et al. 2018, AttnGAN: the
    ground truth among 100 captions, 99 drawn at random): with few held-out captions, ``r``
    is at most ``n_texts``.
    """
    if not 2 <= r <= n_texts:
        raise ValueError(f"r_precision_candidates: need 2 <= r <= {n_texts} distinct captions, got r={r}")
    rows = []
    for i, mine in enumerate(own):
        others = np.delete(np.arange(n_texts), mine)
        drawn = np.random.default_rng([seed, i]).choice(others, size=r - 1, replace=False)
        rows.append(np.concatenate([[mine], drawn]))
    return np.asarray(rows, dtype=np.int64)


def r_precision(image_embeds, text_embeds, candidates: np.ndarray) -> float:
    """Mean over images of P(own caption is the closest of its candidates), by cosine.

    ``text_embeds`` holds one row per distinct caption; ``candidates`` comes from
    :func:`r_precision_candidates` (own caption in column 0). A tie at the top shares the
    hit evenly, so a constant image scores exactly the chance level 1/r.
    """
    img = np.asarray(image_embeds, np.float64)
    txt = np.asarray(text_embeds, np.float64)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    scores = np.einsum("nd,nrd->nr", img, txt[candidates])
    own, others = scores[:, :1], scores[:, 1:]
    beaten = (others > own).any(axis=1)
    tied = (others == own).sum(axis=1)
    return float(np.mean(np.where(beaten, 0.0, 1.0 / (1.0 + tied))))
