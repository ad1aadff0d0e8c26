"""Small helpers shared by the data tests."""

from __future__ import annotations

import numpy as np

from effdet_jax.data.config import default_data_config


def tiny_shapes_config(**overrides):
    """``config.data`` for a handful of small synthetic images."""
    c = default_data_config()
    c.shapes.num_train = 12
    c.shapes.num_eval = 5
    c.shapes.image_size = 64
    c.num_parallel_calls = 2
    c.shuffle_buffer = 16
    for k, v in overrides.items():
        c[k] = v
    return c


def take(pipeline, n: int) -> list[dict]:
    """The first ``n`` numpy batches of a pipeline."""
    it = iter(pipeline)
    return [next(it) for _ in range(n)]


def valid_rows(batch: dict, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes and classes of image ``b`` of a batch, without padding rows."""
    keep = batch["classes"][b] != -1
    return batch["boxes"][b][keep], batch["classes"][b][keep]
