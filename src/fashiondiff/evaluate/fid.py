"""The standard FID: torchmetrics' FrechetInceptionDistance over torch-fidelity's Inception-v3.

Usage::

    fid, status = inception_fid(params.evaluate.fid_weights, device)  # (None, "skipped: ...") if no weights
    fid.update(real_uint8, real=True)          # (N, 3, H, W) uint8 RGB
    fid.update(fake_uint8, real=False)
    value = float(fid.compute())

What is computed (and nothing else, never a substitute):

* features: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF1 2015-12-05 graph
  ported to PyTorch), 2048-d pool3 features, with the weights file at
  ``evaluate.fid_weights`` (torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``);
* resize: uint8 images go to 299x299 through torch-fidelity's TF1-compatible bilinear
  interpolation (``antialias=False``). torchmetrics >= 1.8 defaults to ``antialias=True``
  (torch's antialiased bilinear), which gives other numbers whenever images are
  downsampled; with ``antialias=False`` torchmetrics' ``NoTrainInceptionV3`` calls
  ``interpolate_bilinear_2d_like_tensorflow1x`` exactly as torch-fidelity does;
* distance: ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64, as
  ``torch_fidelity.calculate_metrics(fid=True)``.

The weights file is loaded with ``torch.load(weights_only=True)`` first; torch-fidelity's
own loader (which unpickles) only ever sees a temporary copy re-saved from those tensors.
A file that is not an Inception-v3 state dict stops with a one-line PipelineError.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from fashiondiff.errors import PipelineError
from fashiondiff.spread import disk_full_is_an_error

FID_FEATURES = 2048
FID_RESIZE = "torch-fidelity's TF1-compatible bilinear resize to 299x299 (antialias=False)"


def _one_line(text: str, limit: int = 300) -> str:
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _load_error(exc: Exception) -> str:
    """The useful part of torch.load's error (its weights_only message is mostly advice)."""
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith(advice)]
    text = _one_line("\n".join(lines), 160) or "weights_only refused it"
    return f"{type(exc).__name__}: {text}"


def _state_dict_error(exc: Exception) -> str:
    """load_state_dict's error as counts and first names, on one line."""
    parts = []
    for line in str(exc).splitlines():
        line = line.strip()
        for label, prefix in (
            ("missing", "Missing key(s) in state_dict:"),
            ("unexpected", "Unexpected key(s) in state_dict:"),
        ):
            if line.startswith(prefix):
                keys = [k.strip().strip('"') for k in line[len(prefix) :].rstrip(". ").split(",")]
                parts.append(f"{len(keys)} {label} keys, e.g. {keys[0]}")
        if line.startswith("size mismatch for"):
            parts.append(line.rstrip("."))
    return _one_line("; ".join(parts) or str(exc), 300)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_inception_weights(path: str | Path) -> dict:
    """The state dict in ``path``, loaded with ``weights_only=True``: a flat dict of tensors.

    Raises a one-line PipelineError naming the file if it cannot be read that way.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or pickled objects
        raise PipelineError(
            f"evaluate.fid_weights {path}: not an Inception-v3 state dict "
            f"(torch.load(weights_only=True) failed: {_load_error(exc)})"
        ) from None
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    ):
        raise PipelineError(
            f"evaluate.fid_weights {path}: not an Inception-v3 state dict "
            f"(expected a dict of tensors, got {type(state).__name__})"
        )
    return state


def build_fid_metric(path: str | Path, state: dict):
    """torchmetrics' FrechetInceptionDistance (2048-d, antialias=False) over ``state``.

    torch-fidelity's loader unpickles (``weights_only=False``), so it is handed a
    temporary file re-saved here from the already validated tensors, never ``path``.
    """
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    with tempfile.TemporaryDirectory(prefix="fashiondiff-inception-") as tmp:
        copy = Path(tmp) / "inception.pth"
        with disk_full_is_an_error(copy, lambda: "TMPDIR names a folder with room for it"):
            torch.save(state, copy)
        try:
            # sync_on_compute=False: under `accelerate launch` torchmetrics would gather the states of
            # every process in compute(), a collective that only process 0 reaches here: the
            # processes' states are handed over and summed by fid_from_parts instead.
            return FrechetInceptionDistance(
                feature=FID_FEATURES,
                reset_real_features=False,
                normalize=False,
                feature_extractor_weights_path=str(copy),
                antialias=False,
                sync_on_compute=False,
                compute_with_cache=False,
            )
        except RuntimeError as exc:  # load_state_dict: missing/unexpected keys, size mismatch
            raise PipelineError(
                f"evaluate.fid_weights {path}: not an Inception-v3 state dict ({_state_dict_error(exc)})"
            ) from None


SIDES = {
    True: ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"),
    False: ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples"),
}


def fid_state(metric, real: bool) -> dict:
    """One side's running sums (torchmetrics' states), on the CPU: what a process hands over."""
    return {name: getattr(metric, name).detach().cpu().clone() for name in SIDES[real]}


def fid_from_parts(metric, real: list[dict], fake: list[dict]) -> float:
    """The FID of ``metric`` over the states several processes accumulated, summed in the order
    given (one part: exactly its own state). torchmetrics sums the same way across processes."""
    for is_real, parts in ((True, real), (False, fake)):
        for name in SIDES[is_real]:
            total = parts[0][name].clone()
            for part in parts[1:]:
                total += part[name]
            setattr(metric, name, total.to(metric.device))
    return float(metric.compute())


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torchmetrics", "torch-fidelity"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return ", ".join(out)


def inception_fid(weights: str, device=None):
    """``(FrechetInceptionDistance, status)``, or ``(None, "skipped: <why>")``.

    ``weights``: path to torch-fidelity's Inception-v3 weights (``evaluate.fid_weights``).
    Empty or missing: FID is skipped and the status says why. Not loadable as an
    Inception-v3 state dict: PipelineError. Feed the metric uint8 (N, 3, H, W) RGB
    batches; the real statistics survive ``reset()`` (``reset_real_features=False``).
    """
    if not weights:
        return None, (
            "skipped: evaluate.fid_weights is empty (fetch torch-fidelity's Inception weights "
            "into weights/inception/ with `dvc import-url`, then set it to weights/inception/"
            "weights-inception-2015-12-05-6726825d.pth: docs/fid.md)"
        )
    path = Path(weights)
    if not path.is_file():
        return None, f"skipped: evaluate.fid_weights {weights}: no such file"
    try:
        import torch_fidelity  # noqa: F401  (the feature extractor)
        import torchmetrics.image.fid  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision that does not match torch
        return None, (
            f"skipped: torchmetrics/torch-fidelity not importable ({type(exc).__name__}: "
            f"{_one_line(exc, 160)}); both are in requirements.txt: `make install`"
        )
    metric = build_fid_metric(path, load_inception_weights(path))
    if device is not None:
        metric = metric.to(device)
    status = (
        f"computed: torchmetrics FrechetInceptionDistance(feature={FID_FEATURES}, antialias=False) over "
        f"torch-fidelity's Inception-v3 ({_versions()}), weights {weights} "
        f"(sha256 {_sha256(path)[:16]}); uint8 RGB images, {FID_RESIZE}"
    )
    return metric, status
