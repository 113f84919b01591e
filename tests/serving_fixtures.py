"""Shared by the serving tests: tiny base and tuned Kandinsky 2.1 folders, photos and a LoRA
adapter (the servers themselves: fashiondiff.processes.running)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import params_tree
from PIL import Image

PROMPT = "black leather mini skirt"
SIDE = 64  # model.resolution of the served tiny models


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """``models/base/{prior,decoder}`` and ``models/{prior,decoder}`` (other random weights: the
    "tuned" one), a photo, a non-image named .png, a params.yaml pointing at the base."""
    from fashiondiff.standin.tiny import TinySpec, build_tiny, save_pipelines

    root = tmp_path_factory.mktemp("served")
    texts = [PROMPT, "white cotton shirt", "blue denim jacket", "red silk dress"] * 3
    spec = TinySpec(clip_image_size=32, clip_patch_size=16)
    save_pipelines(build_tiny(texts, spec, seed=0), root / "models/base")
    save_pipelines(build_tiny(texts, spec, seed=1), root / "models")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "photo.png")
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(root / "big.png")  # ~120 KB
    (root / "fake.png").write_text("not an image")
    small = {
        "diffusion_steps": 4,
        "model.resolution": SIDE,
        "evaluate.prior_steps": 2,  # 4 x strength 0.3: 1 step
        "model.prior": str(root / "models/base/prior"),
        "model.decoder": str(root / "models/base/decoder"),
        "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params_tree(**small)))
    return root


@pytest.fixture(scope="session")
def adapters(served) -> Path:
    """``served/adapters/decoder/lora``: a rank-4 LoRA adapter for the base U-Net, as training
    writes it, with random B weights (a fresh adapter's B is zero: it would change nothing)."""
    import torch
    from conftest import repo_params

    from fashiondiff.models.adapter import save_adapter
    from fashiondiff.models.loader import load_component
    from fashiondiff.train.lora import add_lora

    unet = load_component(str(served / "models/base/decoder"), "unet", "model.decoder")
    add_lora(unet, repo_params(**{"decoder.lora_rank": 4}).decoder, "decoder")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in unet.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    save_adapter(unet, served / "adapters/decoder/lora")
    return served / "adapters"
