"""Differences between an exported runtime's outputs and the JAX model's on the same images.

Raw outputs: max |exported - jax| over each output, divided by max |jax| of that output (the
"output scale"), then the max over outputs. With NMS: the first ``top_k`` detections per image
(the outputs are sorted by score): boxes in pixels, scores, and the number of class mismatches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from effdet_jax.export.serving import NMS_OUTPUTS

TOP_K = 20


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
    """``box_px`` / ``score`` max abs differences and ``class_mismatches`` over the first
    ``top_k`` rows per image, plus ``valid_mismatches`` (images whose valid count differs)."""
    ref = dict(zip(NMS_OUTPUTS, reference, strict=True))
    out = dict(zip(NMS_OUTPUTS, exported, strict=True))
    rows = slice(0, top_k)
    return {
        "box_px": float(np.abs(np.asarray(out["boxes"])[:, rows] - ref["boxes"][:, rows]).max()),
        "score": float(np.abs(np.asarray(out["scores"])[:, rows] - ref["scores"][:, rows]).max()),
        "class_mismatches": int((np.asarray(out["classes"])[:, rows] != ref["classes"][:, rows]).sum()),
        "valid_mismatches": int((np.asarray(out["valid"]) != ref["valid"]).sum()),
    }


def compare(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], with_nms: bool) -> dict:
    """The parity record of one format (see the module docstring)."""
    if with_nms:
        return detection_differences(reference, exported)
    return {"raw_relative": raw_relative_error(reference, exported)}
