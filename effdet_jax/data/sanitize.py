"""In-graph clean-up of ground-truth boxes, shared by every source (tf ops, traced in tf.data)."""

from __future__ import annotations

import tensorflow as tf


def sanitize_boxes(
    boxes: tf.Tensor, classes: tf.Tensor, is_crowd: tf.Tensor, num_classes: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, dict[str, tf.Tensor]]:
    """Fix or drop bad boxes, counting each case.

    Args:
      boxes: [N,4] float32 yxyx, normalised to the image (0..1 inside it).
      classes: [N] int32 label index (anything outside 0..num_classes-1 is unknown).
      is_crowd: [N] bool.
      num_classes: number of label indices.

    Returns:
      (boxes [K,4], classes [K], is_crowd [K], counts) where K <= N. Rules: a NaN/inf coordinate
      drops the box; min > max on an axis swaps the pair; coordinates outside [0,1] are clipped;
      zero width/height after that drops the box; an unknown class drops the box.
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.cast(classes, tf.int32)
    finite = tf.reduce_all(tf.math.is_finite(boxes), axis=1)
    known = (classes >= 0) & (classes < num_classes)
    n_nan = tf.reduce_sum(tf.cast(~finite, tf.int32))
    n_unknown = tf.reduce_sum(tf.cast(finite & ~known, tf.int32))
    keep = finite & known
    boxes = tf.boolean_mask(boxes, keep)
    classes = tf.boolean_mask(classes, keep)
    is_crowd = tf.boolean_mask(tf.cast(is_crowd, tf.bool), keep)

    y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=1)
    inverted = (y0 > y1) | (x0 > x1)
    boxes = tf.stack(
        [tf.minimum(y0, y1), tf.minimum(x0, x1), tf.maximum(y0, y1), tf.maximum(x0, x1)], axis=1
    )
    outside = tf.reduce_any((boxes < 0.0) | (boxes > 1.0), axis=1)
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    nonzero = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    counts = {
        "boxes_nan_dropped": n_nan,
        "boxes_unknown_class_dropped": n_unknown,
        "boxes_inverted_fixed": tf.reduce_sum(tf.cast(inverted & nonzero, tf.int32)),
        "boxes_clipped": tf.reduce_sum(tf.cast(outside & nonzero, tf.int32)),
        "boxes_degenerate_dropped": tf.reduce_sum(tf.cast(~nonzero, tf.int32)),
    }
    return (
        tf.boolean_mask(boxes, nonzero),
        tf.boolean_mask(classes, nonzero),
        tf.boolean_mask(is_crowd, nonzero),
        counts,
    )
