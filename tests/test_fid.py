"""The project's FID against an independent implementation, torch_fidelity.calculate_metrics.

Both read the same weights file (a calibrated random Inception-v3 of the real
architecture, see inception_fixtures). The images are larger than 299 px, so they are
downsampled: there torchmetrics' default antialiased resize and torch-fidelity's
TF1-compatible bilinear resize give very different FIDs (measured: 864.4 vs 19409.9, a
relative gap of 0.955; 0.27 with another calibration), while the two implementations
with the same resize agree to 2e-8 (3.6e-5 with another calibration: float32 features).
The tolerance, 1e-3, sits far below the resize gap: this test fails if ``antialias`` is
left at torchmetrics' default (checked: 864.39 vs 19409.91).
"""

from __future__ import annotations

import os

import pytest
import torch
from inception_fixtures import make_images
from PIL import Image

from fashiondiff.errors import PipelineError
from fashiondiff.evaluate.fid import inception_fid
from fashiondiff.evaluate.heldout import to_uint8

REL_TOL = 1e-3  # the implementations agree to <= 4e-5; the two resizes differ by >= 0.25


def write_folder(folder, images):
    folder.mkdir()
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


def read_folder(folder):
    images = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def reference_fid(generated, real, weights) -> float:
    import torch_fidelity

    metrics = torch_fidelity.calculate_metrics(
        input1=str(generated),
        input2=str(real),
        fid=True,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        feature_extractor_weights_path=str(weights),
    )
    return metrics["frechet_inception_distance"]


def project_fid(generated, real, weights) -> float:
    """As evaluate does it: real side first, then the generated side."""
    metric, status = inception_fid(str(weights))
    assert metric is not None and status.startswith("computed:") and "antialias=False" in status
    metric.update(to_uint8(read_folder(real)), real=True)
    metric.update(to_uint8(read_folder(generated)), real=False)
    assert int(metric.fake_features_num_samples) == len(read_folder(generated))
    return float(metric.compute())


@pytest.mark.slow
def test_fid_equals_torch_fidelity_with_downsampled_images(tmp_path, inception_weights):
    generated = write_folder(tmp_path / "generated", make_images(6, 512, seed=1))
    real = write_folder(tmp_path / "real", make_images(6, 384, seed=2))
    reference = reference_fid(generated, real, inception_weights)
    ours = project_fid(generated, real, inception_weights)
    assert reference > 1.0  # the calibrated random network does not collapse
    assert ours == pytest.approx(reference, rel=REL_TOL)

    # The images discriminate the resizes: torchmetrics' default (antialiased) misses by far.
    from torchmetrics.image.fid import FrechetInceptionDistance

    antialiased = FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(inception_weights), antialias=True
    )
    antialiased.update(to_uint8(read_folder(real)), real=True)
    antialiased.update(to_uint8(read_folder(generated)), real=False)
    gap = abs(float(antialiased.compute()) - reference) / reference
    assert gap > 20 * REL_TOL, f"resize gap {gap:.3g} too small to test the resize"


def _error(path) -> str:
    with pytest.raises(PipelineError) as info:
        inception_fid(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "not an Inception-v3 state dict" in message
    return message


def test_corrupt_weights_file_is_one_line_error(tmp_path, inception_weights):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    _error(garbage)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(inception_weights.read_bytes()[:1_000_000])
    _error(truncated)


def test_wrong_architecture_is_one_line_error(tmp_path, inception_weights):
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, other)
    assert "missing keys" in _error(other)
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # a 1000-class head instead of 1008
    state["fc.bias"] = torch.zeros(1000)
    head = tmp_path / "head.pth"
    torch.save(state, head)
    assert "fc.weight" in _error(head)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "epoch": 3}, wrapped)
    _error(wrapped)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "x": _Payload(str(marker))}, evil)
    assert "weights_only" in _error(evil)
    assert not marker.exists()


def test_no_weights_no_fid(tmp_path):
    for weights in ("", str(tmp_path / "absent.pth")):
        metric, status = inception_fid(weights)
        assert metric is None and status.startswith("skipped: evaluate.fid_weights")
