"""Metrics against independent references: closed forms, eigendecompositions, hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from fashiondiff.evaluate.clip import ClipEncoder, clip_score, count_truncated
from fashiondiff.evaluate.fid import inception_fid
from fashiondiff.evaluate.metrics import (
    GaussianStats,
    frechet_distance,
    frechet_distance_from_features,
    r_precision,
    r_precision_candidates,
)


def reference_fd(mu1, s1, mu2, s2) -> float:
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2): symmetric eigendecompositions only."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ s2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_one_dimensional_and_same_gaussian():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    rng = np.random.default_rng(1)
    s = random_spd(rng, 6)
    assert frechet_distance(np.ones(6), s, np.ones(6), s) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_fd_random_spd_matches_reference(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference_fd(mu1, s1, mu2, s2), rel=1e-8)


@pytest.mark.parametrize("n,d", [(4, 32), (16, 64), (300, 8)])
def test_fd_from_features_incl_singular_covariances(n, d):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d)).astype(np.float32)
    b = (rng.normal(size=(n + 3, d)) * 1.5 + 0.2).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expected = reference_fd(a64.mean(0), np.cov(a64, rowvar=False), b64.mean(0), np.cov(b64, rowvar=False))
    got = frechet_distance_from_features(a, b)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-6)


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_gaussian_stats_streamed_equals_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 7)) * 3 + 10
    stats = GaussianStats()
    for chunk in (x[:1], x[1:8], x[8:31], x[31:]):
        stats.update(chunk)
    mean, cov = stats.moments()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_clip_score_definition_on_hand_made_vectors():
    img = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]])
    txt = np.array([[5.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    # cosines 1, 1/sqrt(2), -1 (clamped to 0), 1
    expected = (100 + 100 / np.sqrt(2) + 0 + 100) / 4
    assert clip_score(img, txt) == pytest.approx(expected)
    assert clip_score(img * 7, txt * 0.1) == pytest.approx(expected)  # scale-free
    with pytest.raises(ValueError):
        clip_score(img, txt[:3])


def test_r_precision_candidates_hold_the_own_caption_and_distinct_others():
    own = [3, 0, 3, 5]
    candidates = r_precision_candidates(own, n_texts=6, r=4, seed=1)
    assert candidates.shape == (4, 4) and candidates[:, 0].tolist() == own
    for row in candidates:
        assert len(set(row.tolist())) == 4 and all(0 <= j < 6 for j in row)
    assert np.array_equal(candidates, r_precision_candidates(own, 6, 4, seed=1))  # seeded
    assert not np.array_equal(candidates, r_precision_candidates(own, 6, 4, seed=2))
    with pytest.raises(ValueError):
        r_precision_candidates(own, 6, 7, seed=1)


def test_r_precision_on_hand_made_vectors():
    texts = np.eye(3)  # three captions, orthogonal
    candidates = np.array([[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    images = np.array([[1.0, 0.1, 0.0], [0.2, 0.9, 0.0], [1.0, 0.0, 0.0]])  # hits, hits, misses
    assert r_precision(images, texts, candidates) == pytest.approx(2 / 3)
    assert r_precision(images * 5, texts * 0.5, candidates) == pytest.approx(2 / 3)  # scale-free
    same = np.ones((3, 3))  # an image equally close to every candidate scores chance, 1/r
    assert r_precision(same, texts, candidates) == pytest.approx(1 / 3)
    tie = np.array([[1.0, 1.0, 0.0]] * 3)  # own tied with one other: half a hit for rows 0 and 1
    assert r_precision(tie, texts, candidates) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


@pytest.fixture(scope="module")
def tiny_prior():
    from fashiondiff.standin.tiny import TinySpec, build_tiny, prior_pipeline

    texts = ["black leather mini skirt", "white cotton shirt", "blue denim jacket"] * 4
    return prior_pipeline(build_tiny(texts, TinySpec(clip_image_size=32, clip_patch_size=16)))


def test_truncation_count_and_text_embeds(tiny_prior):
    long = " ".join(["black leather mini skirt"] * 40)  # far over 77 tokens
    texts = ["white cotton shirt", long, "blue denim jacket", long + " white"]
    assert count_truncated(tiny_prior.tokenizer, texts) == 2
    assert count_truncated(tiny_prior.tokenizer, []) == 0
    clip = ClipEncoder(tiny_prior, image_size=32, batch_size=3)
    embeds = clip.encode_texts(texts)
    assert embeds.shape == (4, tiny_prior.text_encoder.config.projection_dim)
    # both long captions keep the same first 77 tokens, so they embed the same
    np.testing.assert_allclose(embeds[1], embeds[3], rtol=1e-5, atol=1e-6)


def test_clip_encoder_score_equals_cosine(tiny_prior):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(3)]
    clip = ClipEncoder(tiny_prior, image_size=32, batch_size=2)
    img, txt = clip.encode_images(images), clip.encode_texts(["a", "white cotton shirt", "skirt"])
    cos = np.sum(img * txt, 1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert clip_score(img, txt) == pytest.approx(np.mean(np.maximum(100 * cos, 0)), rel=1e-6)


def test_clip_encoder_rejects_wrong_image_size(tiny_prior):
    from fashiondiff.errors import PipelineError

    with pytest.raises(PipelineError, match="clip_image_size"):
        ClipEncoder(tiny_prior, image_size=224)


def test_fid_absent_says_why(tmp_path):
    metric, status = inception_fid("")
    assert metric is None and status.startswith("skipped:")
    metric, status = inception_fid(str(tmp_path / "missing.pth"))
    assert metric is None and status.startswith("skipped:")
