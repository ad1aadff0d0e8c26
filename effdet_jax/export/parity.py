"""Differences between an exported runtime's outputs and the JAX model's on the same images.

Raw outputs: max |exported - jax| over each output, divided by max |jax| of that output (the
"output scale"), then the max over outputs. With NMS: the first ``top_k`` detections per image
(the outputs are sorted by score): boxes in pixels and relative to each box's extent, scores,
and the number of class mismatches.

Box coordinates are decoded as ``anchor_centre + delta * anchor_size`` (``exp(delta) *
anchor_size`` for the extent), so a raw delta difference reaches the box multiplied by the anchor
size (up to ~900 px at P7 for D0): a difference of one part in 1e5 in a raw output, 10x inside the
raw bar, moves a 512-px box by ~5e-3 px. ``box_rel`` (difference / extent, extent at least
:data:`BOX_EXTENT_FLOOR_PX`) measures boxes on that scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from effdet_jax.export.serving import NMS_OUTPUTS

TOP_K = 20
# ``box_rel`` divides a box's difference by its extent, at least this many pixels.
BOX_EXTENT_FLOOR_PX = 20.0


def raw_relative_error(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray]) -> float:
    """Max over outputs of ``max |exported - reference| / max |reference|``; ``inf`` where either
    side holds a non-finite value (a NaN would otherwise compare as no difference)."""
    worst = 0.0
    for ref, out in zip(reference, exported, strict=True):
        ref = np.asarray(ref, np.float64)
        if not (np.isfinite(ref).all() and np.isfinite(np.asarray(out, np.float64)).all()):
            return float("inf")
        scale = max(float(np.abs(ref).max()), 1e-12)
        worst = max(worst, float(np.abs(np.asarray(out, np.float64) - ref).max()) / scale)
    return worst


def detection_differences(
    reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], top_k: int = TOP_K
) -> dict[str, float]:
    """``box_px`` / ``score`` max abs differences, ``box_rel`` (max over rows of the box's
    difference / its extent) and ``class_mismatches`` over the first ``top_k`` rows per image,
    plus ``valid_mismatches`` (images whose valid count differs)."""
    ref = dict(zip(NMS_OUTPUTS, reference, strict=True))
    out = dict(zip(NMS_OUTPUTS, exported, strict=True))
    rows = slice(0, top_k)
    ref_boxes = np.asarray(ref["boxes"], np.float64)[:, rows]
    diff = np.abs(np.asarray(out["boxes"], np.float64)[:, rows] - ref_boxes).max(-1)
    extent = np.maximum(ref_boxes[..., 2] - ref_boxes[..., 0], ref_boxes[..., 3] - ref_boxes[..., 1])
    return {
        "box_px": float(diff.max()),
        "box_rel": float((diff / np.maximum(extent, BOX_EXTENT_FLOOR_PX)).max()),
        "score": float(np.abs(np.asarray(out["scores"])[:, rows] - ref["scores"][:, rows]).max()),
        "class_mismatches": int((np.asarray(out["classes"])[:, rows] != ref["classes"][:, rows]).sum()),
        "valid_mismatches": int((np.asarray(out["valid"]) != ref["valid"]).sum()),
    }


def compare(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], with_nms: bool) -> dict:
    """The parity record of one format (see the module docstring)."""
    if with_nms:
        return detection_differences(reference, exported)
    return {"raw_relative": raw_relative_error(reference, exported)}
