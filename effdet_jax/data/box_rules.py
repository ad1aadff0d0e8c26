"""The rule for malformed ground-truth boxes, in one place for training and evaluation.

``apply_box_rule`` is written against a small ops table so that the same code runs as tf ops in
the input pipeline (``sanitize.sanitize_boxes``, normalised boxes) and as numpy on the host when
the evaluation ground truth is read from a COCO json (``sanitize_coco_dataset``, pixel boxes).
The rule, per box:

* a bbox that is missing, not a list of 4 numbers, or has a NaN/inf coordinate: dropped
  (``boxes_nan_dropped``);
* a category that is not in the label map: dropped (``boxes_unknown_class_dropped``);
* min > max on an axis (negative width/height in COCO terms): the pair is swapped
  (``boxes_inverted_fixed``);
* a coordinate outside the image: clipped to the border (``boxes_clipped``);
* zero width or height after that: dropped (``boxes_degenerate_dropped``).

Crowd boxes follow the same rule; removing them from training examples is a training-only rule
(``pipeline.train_example``), as are the instance cap and crops. A clean json (COCO's official
val json) meets none of the cases, and its annotations pass through unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

# Counters of ``counts.COUNT_KEYS`` that this rule sets, in the order a report lists them.
RULE_KEYS: tuple[str, ...] = (
    "boxes_nan_dropped",
    "boxes_unknown_class_dropped",
    "boxes_inverted_fixed",
    "boxes_clipped",
    "boxes_degenerate_dropped",
)
MAX_EXAMPLES = 5


class Ops(NamedTuple):
    """Array functions the rule needs (numpy or tf)."""

    isfinite: Callable
    minimum: Callable
    maximum: Callable
    clip: Callable  # clip(x, lo, hi)
    where: Callable
    zeros_like: Callable


NUMPY_OPS = Ops(
    isfinite=np.isfinite,
    minimum=np.minimum,
    maximum=np.maximum,
    clip=np.clip,
    where=np.where,
    zeros_like=np.zeros_like,
)


def apply_box_rule(
    ops: Ops, y0: Any, x0: Any, y1: Any, x1: Any, known: Any, height: Any, width: Any
) -> tuple[tuple[Any, Any, Any, Any], dict[str, Any]]:
    """The rule on N boxes given as yxyx coordinate vectors.

    Args:
      ops: ``NUMPY_OPS`` or the tf table of ``sanitize.py``.
      y0, x0, y1, x1: [N] float coordinates (yxyx; pixels or normalised, matching height/width).
        A malformed bbox is given as NaNs.
      known: [N] bool, whether the box's category is in the label map.
      height, width: image size in the units of the boxes (1.0 for normalised boxes; ``inf``
        when unknown, which disables clipping), scalars or [N].

    Returns:
      ((y0, x0, y1, x1) fixed, masks): masks are [N] bool, one per ``RULE_KEYS`` entry plus
      ``keep``; rows that are dropped hold meaningless coordinates.
    """
    finite = ops.isfinite(y0) & ops.isfinite(x0) & ops.isfinite(y1) & ops.isfinite(x1)
    valid = finite & known
    # NaN rows are replaced by zeros so that no NaN reaches the comparisons below.
    z = ops.zeros_like(y0)
    y0, x0, y1, x1 = (ops.where(finite, v, z) for v in (y0, x0, y1, x1))
    inverted = (y0 > y1) | (x0 > x1)
    y0, y1 = ops.minimum(y0, y1), ops.maximum(y0, y1)
    x0, x1 = ops.minimum(x0, x1), ops.maximum(x0, x1)
    outside = (y0 < 0) | (x0 < 0) | (y1 > height) | (x1 > width)
    y0, y1 = ops.clip(y0, 0.0, height), ops.clip(y1, 0.0, height)
    x0, x1 = ops.clip(x0, 0.0, width), ops.clip(x1, 0.0, width)
    nonzero = (y1 > y0) & (x1 > x0)
    keep = valid & nonzero
    masks = {
        "boxes_nan_dropped": ~finite,
        "boxes_unknown_class_dropped": finite & ~known,
        "boxes_inverted_fixed": keep & inverted,
        "boxes_clipped": keep & outside,
        "boxes_degenerate_dropped": valid & ~nonzero,
        "keep": keep,
    }
    return (y0, x0, y1, x1), masks


def parse_bbox(ann: Mapping[str, Any]) -> list[float]:
    """A COCO annotation's ``bbox`` as 4 floats ``[x, y, w, h]`` (pixels); NaNs when it is
    missing, not a list/tuple of 4 numbers, or holds something that is not a number."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        return [math.nan] * 4
    try:
        return [float(v) for v in bbox]
    except (TypeError, ValueError):
        return [math.nan] * 4


def as_int(value: Any, default: int = -1) -> int:
    """``value`` as an int id (``category_id``, ``image_id``), ``default`` when it is not one: a
    malformed id makes its annotation unknown instead of failing the run."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) and f == int(f) else default


def _size(image: Mapping[str, Any], key: str) -> float:
    try:
        v = float(image.get(key))
    except (TypeError, ValueError):
        return math.inf
    return v if math.isfinite(v) and v > 0 else math.inf


@dataclasses.dataclass
class GroundTruthReport:
    """What the rule did to a ground-truth json: counts per rule and example annotation ids."""

    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {k: 0 for k in RULE_KEYS})
    examples: dict[str, list] = dataclasses.field(
        default_factory=lambda: {k: [] for k in RULE_KEYS})
    num_annotations: int = 0
    num_kept: int = 0
    # Annotations whose ``image_id`` the json does not list (left out), with example ids.
    num_unknown_image: int = 0
    unknown_image_examples: list = dataclasses.field(default_factory=list)
    # (position in the json's ``annotations`` list, rule) of the first annotation the rule drops
    # or changes (``"boxes_unknown_image_dropped"`` for an unknown image id); None when none.
    first_flagged: tuple[int, str] | None = None

    @property
    def num_dropped(self) -> int:
        return self.num_annotations - self.num_kept

    def format(self) -> str:
        """One line: kept/total and every non-zero rule with up to 5 annotation ids."""
        parts = [f"{self.num_kept} of {self.num_annotations} ground-truth boxes kept "
                 f"({self.num_dropped} dropped)"]
        for k in RULE_KEYS:
            if self.counts[k]:
                parts.append(f"{k}={self.counts[k]} (e.g. annotation ids {self.examples[k]})")
        if self.num_unknown_image:
            parts.append(f"boxes_unknown_image_dropped={self.num_unknown_image} "
                         f"(e.g. annotation ids {self.unknown_image_examples})")
        return "; ".join(parts)


def sanitize_coco_dataset(
    dataset: Mapping[str, Any],
    known_category_ids: set[int],
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
) -> tuple[dict[str, Any], GroundTruthReport]:
    """A COCO json (parsed) with the rule applied to its annotations, for evaluation.

    Boxes are xywh pixels, clipped to the image size: ``image_sizes[image_id]`` (``(height,
    width)`` of the decoded file, which wins over the json) where given, else the json's image
    ``width``/``height`` (no clipping when the image has neither). Dropped annotations are left
    out; fixed ones get the new ``bbox`` and ``area = w * h`` (unless they have a
    ``segmentation``: their json ``area`` is the segment's, which the box fix does not change);
    unchanged ones are copied as they are (their json ``area`` is kept: COCO's
    small/medium/large split uses it). Crowd annotations stay, as crowd.
    Fields pycocotools needs are filled in only when missing or invalid: ``iscrowd`` 0, ``area``
    w*h (when not a positive number), ``id`` a fresh number.
    Annotations of an image id the json does not list are left out (they would score nothing)
    and counted (``num_unknown_image``).
    """
    image_sizes = image_sizes or {}
    images = {}
    for im in dataset.get("images", []):
        try:
            images[int(im["id"])] = im
        except (KeyError, TypeError, ValueError):
            continue
    anns = list(dataset.get("annotations", []) or [])
    report = GroundTruthReport(num_annotations=len(anns))
    rows, positions, boxes, known, hw = [], [], [], [], []
    for position, ann in enumerate(anns):
        image_id = as_int(ann.get("image_id"))
        image = images.get(image_id)
        if image is None:
            report.num_unknown_image += 1
            if len(report.unknown_image_examples) < MAX_EXAMPLES:
                report.unknown_image_examples.append(ann.get("id"))
            if report.first_flagged is None:
                report.first_flagged = (position, "boxes_unknown_image_dropped")
            continue
        cat_known = as_int(ann.get("category_id")) in known_category_ids
        rows.append(ann)
        positions.append(position)
        boxes.append(parse_bbox(ann))
        known.append(cat_known)
        hw.append(image_sizes.get(image_id) or (_size(image, "height"), _size(image, "width")))
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = np.asarray(hw, np.float64).reshape(-1, 2).T
    x, y, bw, bh = b.T
    with np.errstate(invalid="ignore"):
        (y0, x0, y1, x1), masks = apply_box_rule(
            NUMPY_OPS, y, x, y + bh, x + bw, np.asarray(known, bool), h, w)
    for k in RULE_KEYS:
        idx = np.flatnonzero(masks[k])
        report.counts[k] = int(idx.size)
        report.examples[k] = [rows[i].get("id") for i in idx[:MAX_EXAMPLES]]
        if idx.size and (report.first_flagged is None or positions[idx[0]] < report.first_flagged[0]):
            report.first_flagged = (positions[idx[0]], k)
    used_ids = {a.get("id") for a in rows}
    next_id = max((i for i in used_ids if isinstance(i, int)), default=0) + 1
    kept = []
    for i, ann in enumerate(rows):
        if not masks["keep"][i]:
            continue
        ann = dict(ann)  # top-level fields only are replaced; nested ones are shared
        changed = bool(masks["boxes_inverted_fixed"][i] or masks["boxes_clipped"][i]) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in ann["bbox"])
        json_area = ann.get("area")
        valid_area = (isinstance(json_area, int | float) and not isinstance(json_area, bool)
                      and math.isfinite(json_area) and json_area > 0)
        if changed:
            ann["bbox"] = [float(x0[i]), float(y0[i]), float(x1[i] - x0[i]), float(y1[i] - y0[i])]
            # A segment's area does not change with its box; a box-only area does.
            if not (valid_area and ann.get("segmentation")):
                ann["area"] = ann["bbox"][2] * ann["bbox"][3]
        elif not valid_area:
            ann["area"] = float((x1[i] - x0[i]) * (y1[i] - y0[i]))
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
        if "id" not in ann:
            ann["id"], next_id = next_id, next_id + 1
        kept.append(ann)
    report.num_kept = len(kept)
    out = dict(dataset)  # same key order, so a clean json serialises to the same text
    out["annotations"] = kept
    return out, report
