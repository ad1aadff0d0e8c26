"""Encoding of the compact automl reference copy (``tests/reference/automl``).

Shared by ``tools/make_compact_automl_reference.py`` (encode) and ``tests/automl_reference.py``
(decode), so both sides agree on the layout:

* weights: every ``*kernel`` variable is bfloat16-exact by construction, so only its upper 16
  bits are stored, as uint8 [2, *shape]: plane 0 the high byte (sign, 7 exponent bits), plane 1
  the low byte. Split planes deflate about 10% smaller than interleaved uint16. Every other
  variable stays float32. Decoding restores the float32 bits exactly.
* raw outputs ``cls_L`` / ``box_L`` [B, H, W, C]: a subset of spatial positions, all channels and
  all images: ``{name}_L`` [B, n_L, C] float32 with ``index_L`` [n_L] int32, the flat positions
  ``y * W + x`` (every k-th position, k coprime with W so the samples walk across the columns).
  An output stored whole keeps its 4-d shape. ``scale_{name}_L`` is max |value| over the whole
  output (tolerances are relative to it).
* d0 post-processing inputs: ``cls_max_L`` [B, H, W, A] float32 (max logit over the classes of
  each anchor) and ``cls_argmax_L`` [B, H, W, A] uint8 (its class, 0-based), with ``box_L`` whole.
"""

import math

import numpy as np

# About this many positions are kept per level; a level with at most this many is kept whole.
SAMPLES_PER_LEVEL = 24


def encode_weights(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``name -> float32 array`` to the stored form (kernels as uint8 [2, *shape] byte planes)."""
    encoded = {}
    for name, value in arrays.items():
        value = np.asarray(value, np.float32)
        if name.endswith("kernel"):
            bits = value.view(np.uint32)
            if np.any(bits & 0xFFFF):
                raise ValueError(f"{name} is not bfloat16-exact")
            encoded[name] = np.stack([(bits >> 24), (bits >> 16) & 0xFF]).astype(np.uint8)
        else:
            encoded[name] = value
    return encoded


def decode_weights(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_weights`: every value float32, bit for bit the original."""
    return {
        name: _join_planes(value) if value.dtype == np.uint8 else value
        for name, value in stored.items()
    }


def _join_planes(planes: np.ndarray) -> np.ndarray:
    """uint8 [2, *shape] high / low byte planes -> float32 [*shape] with zero low 16 bits."""
    high, low = planes.astype(np.uint32)
    return ((high << 24) | (low << 16)).view(np.float32)


def sample_positions(height: int, width: int, samples: int = SAMPLES_PER_LEVEL) -> np.ndarray:
    """[n] int32 flat positions ``y * width + x`` kept for an [.., height, width, ..] level."""
    total = height * width
    if total <= samples:
        return np.arange(total, dtype=np.int32)
    step = -(-total // samples)
    while math.gcd(step, width) != 1:
        step += 1
    return np.arange(0, total, step, dtype=np.int32)


def take_positions(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """[B, H, W, C] -> [B, n, C]: the positions ``index`` (flat ``y * W + x``)."""
    batch, height, width, channels = array.shape
    return np.asarray(array).reshape(batch, height * width, channels)[:, index]


def reconstruct_cls(cls_max: np.ndarray, cls_argmax: np.ndarray, num_classes: int,
                    fill: float = -100.0) -> np.ndarray:
    """[B, H, W, A] max logits and classes -> [B, H, W, A * num_classes] logits.

    Each anchor's argmax class holds its max logit; every other class holds ``fill``, far below
    any score threshold. Post-processing that keeps one argmax class per anchor sees the same
    candidates, scores and classes as on the full logits.
    """
    *lead, anchors = cls_max.shape
    out = np.full((*lead, anchors, num_classes), fill, np.float32)
    np.put_along_axis(out, cls_argmax[..., None].astype(np.int64), cls_max[..., None], axis=-1)
    return out.reshape(*lead, anchors * num_classes)
