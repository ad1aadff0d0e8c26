"""Differences between an exported runtime's outputs and the JAX model's on the same images.

Raw outputs: max |exported - jax| over each output, divided by max |jax| of that output (the
"output scale"), then the max over outputs. With NMS: the first ``top_k`` detections per image
(the outputs are sorted by score): boxes in pixels and relative to each box's extent, scores,
and the number of class mismatches.

:func:`failures` judges a float32 record against the bars below, so the export command refuses a
file that does not reproduce the model instead of writing it silently. With NMS, rows whose
reference score is within :data:`SCORE_TOLERANCE` of a neighbour's are left out of the class and
box checks: float32 rounding may order such near-tied detections either way, and both orders are
the model's output.

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
# The float32 bars. Raw outputs: of each output's max |value|. Boxes: of each box's extent (at
# least BOX_EXTENT_FLOOR_PX, so 1e-3 px at the floor): decoding multiplies a raw delta
# difference by the anchor size (see above), so a flat pixel bar would demand more of the large
# anchors than of the raw outputs. Scores: absolute.
RAW_TOLERANCE = 1e-4
BOX_RELATIVE_TOLERANCE = 5e-5
SCORE_TOLERANCE = 1e-4


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
    plus ``valid_mismatches`` (images whose valid count differs), ``top_k_valid_mismatches``
    (the same for counts capped at ``top_k``: a detection beyond the compared rows may fall on
    either side of a threshold) and ``untied_box_rel`` /
    ``untied_class_mismatches``: the same over the rows whose reference score differs from both
    neighbours' by more than :data:`SCORE_TOLERANCE`."""
    ref = dict(zip(NMS_OUTPUTS, reference, strict=True))
    out = dict(zip(NMS_OUTPUTS, exported, strict=True))
    rows = slice(0, top_k)
    ref_boxes = np.asarray(ref["boxes"], np.float64)[:, rows]
    diff = np.abs(np.asarray(out["boxes"], np.float64)[:, rows] - ref_boxes).max(-1)
    extent = np.maximum(ref_boxes[..., 2] - ref_boxes[..., 0], ref_boxes[..., 3] - ref_boxes[..., 1])
    box_rel = diff / np.maximum(extent, BOX_EXTENT_FLOOR_PX)
    classes_differ = np.asarray(out["classes"])[:, rows] != np.asarray(ref["classes"])[:, rows]
    untied = ~near_ties(np.asarray(ref["scores"], np.float64)[:, rows])
    return {
        "box_px": float(diff.max()),
        "box_rel": float(box_rel.max()),
        "score": float(np.abs(np.asarray(out["scores"])[:, rows] - ref["scores"][:, rows]).max()),
        "class_mismatches": int(classes_differ.sum()),
        "valid_mismatches": int((np.asarray(out["valid"]) != ref["valid"]).sum()),
        "top_k_valid_mismatches": int((np.minimum(np.asarray(out["valid"]), top_k)
                                       != np.minimum(np.asarray(ref["valid"]), top_k)).sum()),
        "untied_box_rel": float(np.where(untied, box_rel, 0.0).max()),
        "untied_class_mismatches": int((classes_differ & untied).sum()),
    }


def near_ties(scores: np.ndarray) -> np.ndarray:
    """bool ``[batch, k]``: rows of score-sorted ``scores`` ``[batch, k]`` within
    :data:`SCORE_TOLERANCE` of the row before or after them."""
    close = np.abs(np.diff(scores, axis=-1)) <= SCORE_TOLERANCE
    pad = np.zeros(scores.shape[:-1] + (1,), bool)
    return np.concatenate([pad, close], -1) | np.concatenate([close, pad], -1)


def failures(record: dict, with_nms: bool) -> list[str]:
    """What a float32 parity ``record`` (:func:`compare`) misses of the bars, in words; empty
    when the exported file reproduces the model."""
    if not with_nms:
        err = record["raw_relative"]
        return [] if err <= RAW_TOLERANCE else [
            f"raw outputs differ from JAX by {err:.3g} of the output scale (bar {RAW_TOLERANCE:g})"]
    missed = []
    if record["top_k_valid_mismatches"]:
        missed.append(f"the number of detections (up to {TOP_K}) differs on "
                      f"{record['top_k_valid_mismatches']} images")
    if record["untied_class_mismatches"]:
        missed.append(f"{record['untied_class_mismatches']} of the top {TOP_K} detections have "
                      "another class")
    if record["untied_box_rel"] > BOX_RELATIVE_TOLERANCE:
        missed.append(f"boxes differ by {record['untied_box_rel']:.3g} of their extent "
                      f"(bar {BOX_RELATIVE_TOLERANCE:g})")
    if record["score"] > SCORE_TOLERANCE:
        missed.append(f"scores differ by {record['score']:.3g} (bar {SCORE_TOLERANCE:g})")
    return missed


def compare(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], with_nms: bool) -> dict:
    """The parity record of one format (see the module docstring)."""
    if with_nms:
        return detection_differences(reference, exported)
    return {"raw_relative": raw_relative_error(reference, exported)}
