"""Faster R-CNN box coder without scale factors, as automl's ``FasterRcnnBoxCoder()`` (encode)
and ``anchors.decode_box_outputs`` (decode).

Boxes and anchors are ``[..., 4]`` yxyx in the same units (input pixels); deltas are
``[..., 4]`` ``(ty, tx, th, tw)``::

    ty = (yc - yc_a) / h_a      tx = (xc - xc_a) / w_a
    th = log(h / h_a)           tw = log(w / w_a)

Leading dimensions broadcast (e.g. deltas ``[B, A, 4]`` with anchors ``[A, 4]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# automl floors sizes at this before dividing and taking logs.
EPSILON = 1e-8


def encode(boxes: jax.Array, anchors: jax.Array) -> jax.Array:
    """Deltas ``(ty, tx, th, tw)`` that move ``anchors`` onto ``boxes``; both ``[..., 4]`` yxyx."""
    ymin, xmin, ymax, xmax = jnp.moveaxis(boxes, -1, 0)
    a_ymin, a_xmin, a_ymax, a_xmax = jnp.moveaxis(anchors, -1, 0)
    # Centers as min + size/2 (automl's BoxList.get_center_coordinates_and_sizes) so the float32
    # rounding matches its targets bit for bit.
    h, w = ymax - ymin, xmax - xmin
    ha, wa = a_ymax - a_ymin, a_xmax - a_xmin
    yc, xc = ymin + h / 2.0, xmin + w / 2.0
    yca, xca = a_ymin + ha / 2.0, a_xmin + wa / 2.0
    ha, wa = jnp.maximum(ha, EPSILON), jnp.maximum(wa, EPSILON)
    h, w = jnp.maximum(h, EPSILON), jnp.maximum(w, EPSILON)
    return jnp.stack(
        [(yc - yca) / ha, (xc - xca) / wa, jnp.log(h / ha), jnp.log(w / wa)], axis=-1
    )


def decode(deltas: jax.Array, anchors: jax.Array) -> jax.Array:
    """Boxes ``[..., 4]`` yxyx from ``deltas`` ``(ty, tx, th, tw)`` relative to ``anchors``."""
    ty, tx, th, tw = jnp.moveaxis(deltas, -1, 0)
    a_ymin, a_xmin, a_ymax, a_xmax = jnp.moveaxis(anchors, -1, 0)
    yca, xca = (a_ymin + a_ymax) / 2.0, (a_xmin + a_xmax) / 2.0
    ha, wa = a_ymax - a_ymin, a_xmax - a_xmin
    h, w = jnp.exp(th) * ha, jnp.exp(tw) * wa
    yc, xc = ty * ha + yca, tx * wa + xca
    return jnp.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0], axis=-1)
