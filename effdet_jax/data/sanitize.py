"""In-graph clean-up of ground-truth boxes, shared by every source (tf ops, traced in tf.data).

The rule itself is ``box_rules.apply_box_rule``; evaluation applies the same function (numpy) to
the ground-truth json, so a box is fixed or dropped the same way on both sides.
"""

from __future__ import annotations

import tensorflow as tf

from effdet_jax.data.box_rules import RULE_KEYS, Ops, apply_box_rule

TF_OPS = Ops(
    isfinite=tf.math.is_finite,
    minimum=tf.minimum,
    maximum=tf.maximum,
    clip=tf.clip_by_value,
    where=tf.where,
    zeros_like=tf.zeros_like,
)


def sanitize_boxes(
    boxes: tf.Tensor, classes: tf.Tensor, is_crowd: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """Fix or drop bad boxes, counting each case (``box_rules.apply_box_rule``).

    Args:
      boxes: [N,4] float32 yxyx, normalised to the image (0..1 inside it).
      classes: [N] int32 label index (anything outside 0..num_classes-1 is unknown).
      is_crowd: [N] bool.
      num_classes: number of label indices.

    Returns:
      (boxes [K,4], classes [K], is_crowd [K], counts) where K <= N. Rules: a NaN/inf coordinate
      drops the box; an unknown class drops the box; min > max on an axis swaps the pair;
      coordinates outside [0,1] are clipped; zero width/height after that drops the box.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.cast(classes, tf.int32)
    known = (classes >= 0) & (classes < num_classes)
    y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=1)
    fixed, masks = apply_box_rule(TF_OPS, y0, x0, y1, x1, known, 1.0, 1.0)
    keep = masks["keep"]
    counts = {k: tf.reduce_sum(tf.cast(masks[k], tf.int32)) for k in RULE_KEYS}
    return (
        tf.boolean_mask(tf.stack(fixed, axis=1), keep),
        tf.boolean_mask(classes, keep),
        tf.boolean_mask(tf.cast(is_crowd, tf.bool), keep),
        counts,
    )
