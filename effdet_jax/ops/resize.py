"""TF1's legacy nearest-neighbour resize on ``[batch, height, width, channels]``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def resize_nearest_legacy(x: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize of ``x`` ``[N, H, W, C]`` to ``[N, height, width, C]`` with TF1's
    legacy index rule ``src = floor(dst * in / out)`` (``tf.compat.v1.image.resize_nearest_neighbor``,
    align_corners=False, no half-pixel centres).

    This differs from ``jax.image.resize(..., 'nearest')`` when the ratio is not an integer (e.g.
    3 -> 5 gives rows [0, 0, 1, 1, 2] here, [0, 0, 1, 2, 2] there).
    """
    in_h, in_w = x.shape[1], x.shape[2]
    rows = _legacy_nearest_index(in_h, height)
    cols = _legacy_nearest_index(in_w, width)
    if height % in_h == 0 and width % in_w == 0 and height // in_h == width // in_w:
        # Integer upsampling: a repeat is the same gather and much cheaper to differentiate.
        f = height // in_h
        return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


@functools.cache
def _legacy_nearest_index(size_in: int, size_out: int) -> np.ndarray:
    # TF computes the scale in float32 and floors; min() guards the last index.
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, size_in - 1)
