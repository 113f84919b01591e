"""What both training tasks do with a batch: cached arrays to tensors, conditions dropped for guidance."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(array: np.ndarray, device) -> torch.Tensor:
    """A cached array on ``device``: floats as float32 (the cache may hold float16), other dtypes kept."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)


def drop(cond: torch.Tensor, uncond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``cond`` where ``mask`` is True become ``uncond`` (broadcast over the batch)."""
    shape = (-1,) + (1,) * (cond.dim() - 1)
    return torch.where(mask.view(shape), uncond.to(cond.dtype).expand_as(cond), cond)
