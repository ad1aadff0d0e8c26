"""AutoAugment ops that move boxes or act on box regions, as automl's ``aug/autoaugment.py``.

``image``: uint8 ``[height, width, 3]``. ``boxes``: float32 ``[N, 4]`` yxyx normalised to the
image (0..1), the layout at that point of automl's (and this) input pipeline; ``N`` may be 0.
Pixel coordinates are ``int(size * coordinate)`` (truncated), as automl computes them.

* Whole-image geometric ops (``translate_with_boxes``, ``shear_with_boxes``,
  ``rotate_with_boxes``) transform the image and map each box's corners with the same transform;
  the result is clipped to [0, 1] and a side that collapsed to zero length is reopened to
  ``[min(lo, 0.95), max(hi, 0.05)]`` (automl's ``_check_bbox_area``).
* ``bbox_cutout`` cuts a square out of one random box.
* ``only_boxes`` applies an image op to the pixels inside each box separately (the
  ``*_Only_BBoxes`` ops), each box with probability ``prob / 3``; boxes are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tensorflow as tf

from effdet_jax.data import augment_ops

BBOX_ONLY_PROB_DIVISOR = 3.0  # automl's _scale_bbox_only_op_probability
ZERO_AREA_DELTA = 0.05  # automl's _check_bbox_area


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    shape = tf.shape(image)
    return tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)


def _to_pixels(boxes: tf.Tensor, h: tf.Tensor, w: tf.Tensor) -> tf.Tensor:
    """[N,4] normalised yxyx -> [N,4] int32 pixel yxyx (``int(size * coordinate)``)."""
    return tf.cast(boxes * tf.stack([h, w, h, w]), tf.int32)


def _clip_and_open(boxes: tf.Tensor) -> tf.Tensor:
    """Clip to [0, 1]; a zero-length side becomes ``[min(lo, 1 - d), max(hi, d)]`` (d = 0.05)."""
    boxes = tf.clip_by_value(boxes, 0.0, 1.0)
    y0, x0, y1, x1 = tf.unstack(boxes, 4, axis=-1)

    def reopen(lo, hi):
        flat = tf.equal(hi - lo, 0.0)
        return (tf.where(flat, tf.minimum(lo, 1.0 - ZERO_AREA_DELTA), lo),
                tf.where(flat, tf.maximum(hi, ZERO_AREA_DELTA), hi))

    y0, y1 = reopen(y0, y1)
    x0, x1 = reopen(x0, x1)
    return tf.stack([y0, x0, y1, x1], axis=-1)


def translate_with_boxes(image: tf.Tensor, boxes: tf.Tensor, pixels, horizontal: bool):
    """Content and boxes move by ``pixels`` (integer part) to the left / up (negative: right /
    down); box sides are cut at the image border in pixels: ``max(0, lo - p)``,
    ``min(size, hi - p)``."""
    pixels = tf.cast(pixels, tf.float32)
    image = (augment_ops.translate_x if horizontal else augment_ops.translate_y)(image, pixels)
    h, w = _hw(image)
    y0, x0, y1, x1 = tf.unstack(_to_pixels(boxes, h, w), 4, axis=-1)
    p = tf.cast(pixels, tf.int32)
    if horizontal:
        x0, x1 = tf.maximum(0, x0 - p), tf.minimum(tf.cast(w, tf.int32), x1 - p)
    else:
        y0, y1 = tf.maximum(0, y0 - p), tf.minimum(tf.cast(h, tf.int32), y1 - p)
    out = tf.cast(tf.stack([y0, x0, y1, x1], axis=-1), tf.float32) / tf.stack([h, w, h, w])
    return image, _clip_and_open(out)


def _corners(y0, x0, y1, x1) -> tf.Tensor:
    """[N] each -> [N, 2, 4] float32 rows (y, x) of the corners (y0,x0) (y0,x1) (y1,x0) (y1,x1)."""
    ys = tf.stack([y0, y0, y1, y1], axis=-1)
    xs = tf.stack([x0, x1, x0, x1], axis=-1)
    return tf.cast(tf.stack([ys, xs], axis=1), tf.float32)


def _map_corners(matrix: tf.Tensor, corners: tf.Tensor) -> tf.Tensor:
    """[2,2] float32 matrix times [N,2,4] corners, truncated to int32 -> [N,2,4]."""
    return tf.cast(tf.einsum("ij,njk->nik", matrix, corners), tf.int32)


def shear_with_boxes(image: tf.Tensor, boxes: tf.Tensor, level, horizontal: bool):
    """``augment_ops.shear_x`` / ``shear_y`` by ``level``; each box becomes the bounding box of
    its sheared pixel corners (x' = x - level * y, or y' = y - level * x)."""
    level = tf.cast(level, tf.float32)
    image = (augment_ops.shear_x if horizontal else augment_ops.shear_y)(image, level)
    h, w = _hw(image)
    corners = _corners(*tf.unstack(_to_pixels(boxes, h, w), 4, axis=-1))
    if horizontal:
        matrix = tf.stack([tf.stack([1.0, 0.0]), tf.stack([-level, 1.0])])
    else:
        matrix = tf.stack([tf.stack([1.0, -level]), tf.stack([0.0, 1.0])])
    moved = tf.cast(_map_corners(matrix, corners), tf.float32)
    out = tf.stack([tf.reduce_min(moved[:, 0], -1) / h, tf.reduce_min(moved[:, 1], -1) / w,
                    tf.reduce_max(moved[:, 0], -1) / h, tf.reduce_max(moved[:, 1], -1) / w], -1)
    return image, _clip_and_open(out)


def rotate_with_boxes(image: tf.Tensor, boxes: tf.Tensor, degrees):
    """``augment_ops.rotate`` by ``degrees``; each box becomes the bounding box of its corners
    rotated about the image centre (corners as ``int(size * (c - 0.5))`` pixels, y pointing up,
    rotated by ``[[cos, sin], [-sin, cos]]`` on (y, x), truncated to int)."""
    degrees = tf.cast(degrees, tf.float32)
    image = augment_ops.rotate(image, degrees)
    h, w = _hw(image)
    radians = degrees * (math.pi / 180.0)
    centred = tf.cast((boxes - 0.5) * tf.stack([h, w, h, w]), tf.int32)
    y0, x0, y1, x1 = tf.unstack(centred, 4, axis=-1)
    corners = _corners(-y0, x0, -y1, x1)
    cos, sin = tf.cos(radians), tf.sin(radians)
    matrix = tf.stack([tf.stack([cos, sin]), tf.stack([-sin, cos])])
    moved = tf.cast(_map_corners(matrix, corners), tf.float32)
    out = tf.stack([-(tf.reduce_max(moved[:, 0], -1) / h - 0.5),
                    tf.reduce_min(moved[:, 1], -1) / w + 0.5,
                    -(tf.reduce_min(moved[:, 0], -1) / h - 0.5),
                    tf.reduce_max(moved[:, 1], -1) / w + 0.5], -1)
    return image, _clip_and_open(out)


def bbox_cutout(image: tf.Tensor, boxes: tf.Tensor, pad_fraction: float, seed: tf.Tensor):
    """Cut a ``FILL`` rectangle centred at a uniform pixel of one uniformly chosen box, of half
    size ``int(pad_fraction * box_side / 2)`` per axis (box sides in pixels,
    ``hi - lo + 1``); boxes unchanged; no boxes: identity."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    h, w = _hw(image)

    def cut():
        n = tf.shape(boxes)[0]
        box = tf.gather(boxes, tf.random.stateless_uniform([], seeds[0], 0, n, tf.int32))
        y0, x0, y1, x1 = tf.unstack(_to_pixels(box[None], h, w)[0], 4)
        pad_h = tf.cast(pad_fraction * tf.cast(y1 - y0 + 1, tf.float32) / 2.0, tf.int32)
        pad_w = tf.cast(pad_fraction * tf.cast(x1 - x0 + 1, tf.float32) / 2.0, tf.int32)
        cy = tf.random.stateless_uniform([], seeds[1], y0, y1 + 1, tf.int32)
        cx = tf.random.stateless_uniform([], seeds[2], x0, x1 + 1, tf.int32)
        return augment_ops.fill_rect(image, cy - pad_h, cx - pad_w, cy + pad_h, cx + pad_w)

    return tf.cond(tf.shape(boxes)[0] > 0, cut, lambda: image), boxes


def _apply_in_box(image: tf.Tensor, box: tf.Tensor, fn: Callable[[tf.Tensor], tf.Tensor]):
    """``fn`` on the pixels ``[int(h*y0) .. min(int(h*y1), h-1)]`` x (same for x) of ``image``,
    pasted back; a box with no pixels leaves the image unchanged."""
    h, w = _hw(image)
    y0, x0, y1, x1 = tf.unstack(_to_pixels(box[None], h, w)[0], 4)
    hi, wi = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
    y1, x1 = tf.minimum(y1, hi - 1), tf.minimum(x1, wi - 1)

    def paste():
        region = fn(image[y0:y1 + 1, x0:x1 + 1])
        pad = [[y0, hi - 1 - y1], [x0, wi - 1 - x1], [0, 0]]
        inside = tf.pad(tf.ones_like(region, tf.bool), pad)
        return tf.where(inside, tf.pad(region, pad), image)

    return tf.cond((y1 >= y0) & (x1 >= x0), paste, lambda: image)


def only_boxes(image: tf.Tensor, boxes: tf.Tensor, prob: float,
               fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], seed: tf.Tensor):
    """``fn(region, seed)`` on each box's pixels independently with probability
    ``prob / 3``, boxes in a random order; boxes are returned unchanged."""
    prob = prob / BBOX_ONLY_PROB_DIVISOR
    n = tf.shape(boxes)[0]
    order = tf.argsort(tf.random.stateless_uniform([n], seed))

    def body(i, image):
        box_seed = tf.random.experimental.stateless_fold_in(seed, i + 1)
        seeds = tf.random.experimental.stateless_split(box_seed, 2)
        go = tf.random.stateless_uniform([], seeds[0]) < prob
        box = tf.gather(boxes, order[i])
        image = tf.cond(go, lambda: _apply_in_box(image, box, lambda r: fn(r, seeds[1])),
                        lambda: image)
        return i + 1, image

    _, image = tf.while_loop(lambda i, _: i < n, body, [tf.constant(0), image],
                             shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None, 3])])
    return image, boxes
