"""AutoAugment (detection policy v0, a subset) and RandAugment on uint8 images with boxes.

Implemented ops: ``TranslateX_BBox``, ``TranslateY_BBox``, ``Equalize``, ``Cutout``,
``Sharpness``, ``Color``, ``Brightness``, ``Contrast``. Policy v0's ``ShearX_BBox``,
``ShearY_BBox``, ``Rotate_BBox`` and ``TranslateY_Only_BBoxes`` are **not** implemented and act as
the identity, so v0 here keeps its sub-policy structure (5 sub-policies, one drawn per image, each
op applied with its probability) with those ops skipped. Magnitudes follow automl's constants:
translate ``250 * level / 10`` px, cutout ``100 * level / 10`` px, enhance factors
``level / 10 * 1.8 + 0.1``; the fill value is 128. Boxes are yxyx normalised to the image.
"""

from __future__ import annotations

import tensorflow as tf

TRANSLATE_CONST = 250.0
CUTOUT_CONST = 100.0
FILL = 128

# automl policy v0: (op, probability, level) pairs per sub-policy.
POLICY_V0 = (
    (("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)),
    (("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)),
    (("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)),
    (("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)),
    (("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)),
)
RANDAUGMENT_OPS = ("TranslateX_BBox", "TranslateY_BBox", "Equalize", "Cutout", "Sharpness",
                   "Color", "Brightness", "Contrast")


def _blend(a: tf.Tensor, b: tf.Tensor, factor: float) -> tf.Tensor:
    """a + factor * (b - a), clipped to uint8 (factor 0 -> a, 1 -> b)."""
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    return tf.cast(tf.clip_by_value(a + factor * (b - a), 0, 255), tf.uint8)


def _enhance(level: float) -> float:
    return level / 10.0 * 1.8 + 0.1


def _translate(image, boxes, pixels: tf.Tensor, axis: int):
    """Shift content by ``pixels`` along ``axis`` (0 = y, 1 = x), filling with ``FILL``."""
    size = tf.shape(image)[axis]
    p = tf.clip_by_value(tf.cast(pixels, tf.int32), -size, size)
    shifted = tf.roll(image, p, axis=axis)
    idx = tf.range(size)
    valid = (idx >= p) & (idx < size + p)
    valid = valid[:, None, None] if axis == 0 else valid[None, :, None]
    image = tf.where(valid, shifted, tf.cast(FILL, tf.uint8))
    delta = tf.cast(p, tf.float32) / tf.cast(size, tf.float32)
    shift = [delta, 0.0, delta, 0.0] if axis == 0 else [0.0, delta, 0.0, delta]
    return image, tf.clip_by_value(boxes + tf.stack(shift), 0.0, 1.0)


def _equalize(image):
    def channel(c):
        c = tf.cast(c, tf.int32)
        hist = tf.math.bincount(c, minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(hist, hist > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

        def apply():
            lut = (tf.cumsum(hist) - hist + step // 2) // tf.maximum(step, 1)
            return tf.gather(tf.clip_by_value(lut, 0, 255), c)

        return tf.cast(tf.cond(step > 0, apply, lambda: c), tf.uint8)

    return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def _sharpness(image, factor):
    x = tf.cast(image, tf.float32)[None]
    k = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    k = tf.tile(k[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(x, k, [1, 1, 1, 1], "SAME")[0]
    return _blend(blurred, image, factor)


def _cutout(image, size: float, seed):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    c = tf.random.stateless_uniform([2], seed)
    cy = tf.cast(c[0] * tf.cast(h, tf.float32), tf.int32)
    cx = tf.cast(c[1] * tf.cast(w, tf.float32), tf.int32)
    half = int(size) // 2
    ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
    inside = (tf.abs(ys - cy) <= half) & (tf.abs(xs - cx) <= half)
    return tf.where(inside[..., None], tf.cast(FILL, tf.uint8), image)


def apply_op(name: str, image, boxes, level: float, seed):
    """One op at ``level`` (0..10). Unknown / unimplemented ops are the identity."""
    sign = tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)
    if name in ("TranslateX_BBox", "TranslateY_BBox"):
        return _translate(image, boxes, sign * TRANSLATE_CONST * level / 10.0,
                          1 if name == "TranslateX_BBox" else 0)
    if name == "Equalize":
        return _equalize(image), boxes
    if name == "Cutout":
        return _cutout(image, CUTOUT_CONST * level / 10.0, seed), boxes
    if name == "Sharpness":
        return _sharpness(image, _enhance(level)), boxes
    gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    if name == "Color":
        return _blend(gray, image, _enhance(level)), boxes
    if name == "Brightness":
        return _blend(tf.zeros_like(image), image, _enhance(level)), boxes
    if name == "Contrast":
        mean = tf.reduce_mean(tf.cast(gray, tf.float32))
        return _blend(tf.fill(tf.shape(image), mean), image, _enhance(level)), boxes
    return image, boxes


def _maybe(prob, seed, fn, image, boxes):
    if prob <= 0.0:
        return image, boxes
    go = tf.random.stateless_uniform([], seed) < prob
    return tf.cond(go, lambda: fn(image, boxes), lambda: (image, boxes))


def distort(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor, *, policy: str = "",
            randaugment_layers: int = 0, randaugment_magnitude: float = 10):
    """AutoAugment ``policy`` (``"v0"`` or ``""``) then RandAugment; uint8 in, uint8 out."""
    seeds = tf.random.experimental.stateless_split(seed, 3 + 2 * randaugment_layers + 8)
    if policy == "v0":
        choice = tf.random.stateless_uniform([], seeds[0], 0, len(POLICY_V0), tf.int32)
        branches = []
        for s, sub in enumerate(POLICY_V0):
            def run(sub=sub, s=s):
                im, bx = image, boxes
                for j, (name, prob, level) in enumerate(sub):
                    op_seed = seeds[3 + 2 * randaugment_layers + 2 * (s % 4) + j]
                    im, bx = _maybe(prob, op_seed, lambda i, b, n=name, lv=level, sd=op_seed:
                                    apply_op(n, i, b, lv, sd), im, bx)
                return im, bx
            branches.append(run)
        image, boxes = tf.switch_case(choice, branches)
    for layer in range(randaugment_layers):
        k = tf.random.stateless_uniform([], seeds[1 + 2 * layer], 0, len(RANDAUGMENT_OPS),
                                        tf.int32)
        op_seed = seeds[2 + 2 * layer]

        def branch(n, sd=op_seed, im=image, bx=boxes):
            op = lambda i, b: apply_op(n, i, b, randaugment_magnitude, sd)
            return lambda: _maybe(0.5, sd, op, im, bx)

        branches = [branch(n) for n in RANDAUGMENT_OPS]
        image, boxes = tf.switch_case(k, branches)
    return image, boxes
