"""The eval pipeline's letterbox (``data.transforms.resize_crop_pad`` at ``scale_factor=1``) in
JAX, for exported graphs that take images of another size than the model's.

An ``[B, h, w, 3]`` normalised image is resized (bilinear, half-pixel centres, no antialiasing:
``tf.image.resize``'s rule) so its longer side is the model's size ``S`` (sizes truncated to
whole pixels, in float32 as the pipeline computes them), then padded bottom-right with zeros in
normalised space (pixel value ``mean_rgb``) to ``[B, S, S, 3]``. ``image_scale`` (input pixels
per network pixel, ``1 / scale``) maps boxes back. Shapes are static: the geometry is computed
once from the exported input size.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an ``input_hw`` image lands in the ``size`` x ``size`` network input."""

    input_hw: tuple[int, int]
    size: int
    scaled_hw: tuple[int, int]
    image_scale: float  # input pixels per network pixel


def geometry(input_hw: tuple[int, int], size: int) -> Geometry:
    """``resize_crop_pad``'s arithmetic (float32, truncation) for one fixed input size."""
    h, w = (np.float32(v) for v in input_hw)
    target = np.float32(size)
    scale = np.minimum(target / h, target / w)
    scaled = (max(int(h * scale), 1), max(int(w * scale), 1))
    return Geometry(tuple(input_hw), size, scaled, float(np.float32(1.0) / scale))


def letterbox(images: jax.Array, geo: Geometry) -> jax.Array:
    """Normalised float32 ``[B, h, w, 3]`` -> ``[B, S, S, 3]`` (see the module docstring)."""
    batch = images.shape[0]
    resized = jax.image.resize(images, (batch, *geo.scaled_hw, images.shape[-1]), "bilinear",
                               antialias=False)
    return jnp.pad(resized, ((0, 0), (0, geo.size - geo.scaled_hw[0]),
                             (0, geo.size - geo.scaled_hw[1]), (0, 0)))
