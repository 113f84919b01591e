"""A stand-in for torch-fidelity's Inception-v3 weights file (no real weights offline).

``random_inception_weights(path)`` saves a randomly initialised state dict of exactly
torch-fidelity's ``FeatureExtractorInceptionV3`` architecture, in its loader's format
(a ``torch.save``'d state dict). A fresh init collapses (BatchNorm is the identity in
eval mode, every conv shrinks the signal: features' std across images ~4e-10, FID
~1e-15), so the BatchNorm running statistics are first set from a batch of images
(train-mode forward, ``momentum=None``): every layer is then normalised and the 2048-d
pool features differ from image to image (std ~0.2).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest


def make_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """(size, size, 3) uint8 images: smooth colour waves, square-wave stripes near the
    Nyquist rate and noise, so that downsampling with and without antialiasing differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        waves = np.stack(
            [
                np.sin(2 * np.pi * (rng.uniform(1, 4) * xx + rng.uniform(1, 4) * yy) + rng.uniform(0, 6))
                for _ in range(3)
            ],
            axis=-1,
        )
        stripes = np.sign(np.sin(np.pi * xx * size / rng.uniform(1.5, 3.0)))[..., None]
        noise = rng.normal(0.0, 1.0, (size, size, 3))
        pixels = 127 + 60 * waves + 40 * rng.uniform() * stripes + 30 * rng.uniform() * noise
        out.append(np.clip(pixels, 0, 255).astype(np.uint8))
    return out


def random_inception_weights(path: Path, calibration_size: int = 384, n_calibration: int = 4, seed: int = 0) -> Path:
    """Save a calibrated random torch-fidelity Inception-v3 state dict at ``path``."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    # Build the architecture without any weights: no download, no load.
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(
            tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict, *args, **kwargs: None
        ),
    ):
        torch.manual_seed(seed)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: exactly this batch's statistics
    images = torch.from_numpy(np.stack(make_images(n_calibration, calibration_size, seed + 1000)))
    net.train()
    with torch.no_grad():
        net(images.permute(0, 3, 1, 2).contiguous())
    net.eval()
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A calibrated random Inception-v3 weights file (torch-fidelity's format)."""
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")
