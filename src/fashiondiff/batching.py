"""How the method's global batch splits over processes and accumulated micro-batches.

``batch_size`` is the samples of one optimiser step, all processes together: each of N processes
takes ``batch_size / (N x train.gradient_accumulation_steps)`` per micro-step. The training loop
(``fashiondiff.train.loop``) and ``fashiondiff plan`` share this arithmetic and its refusal, so
the plan says what the run will do without importing training.
"""

from __future__ import annotations

from fashiondiff.errors import PipelineError


def split_batch(batch_size: int, world: int, accumulation: int) -> int:
    """Each process's share of a global batch per micro-step, or a one-line refusal."""
    parts = world * accumulation
    if batch_size % parts:
        raise PipelineError(
            f"params: batch_size {batch_size} (the global batch) does not divide into {world} "
            f"process{'es' if world > 1 else ''} x {accumulation} accumulated micro-batch"
            f"{'es' if accumulation > 1 else ''}: use a multiple of {parts}"
        )
    return batch_size // parts
