"""Image-only AutoAugment ops, as automl's ``aug/autoaugment.py`` defines them (TF ops).

Every op takes and returns a uint8 ``[height, width, 3]`` RGB image. Empty pixels left by
geometric ops are filled with ``FILL`` (128, automl's ``replace_value``). Geometric ops resample
with nearest-neighbour projective transforms, as ``tensorflow_addons.image`` does by default
(``transform``, ``translate``, ``rotate``); here they run on TF's own
``ImageProjectiveTransformV3``. Random ops take a stateless ``seed`` ([2] int32).
"""

from __future__ import annotations

import math

import tensorflow as tf

FILL = 128


def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """``image1 + factor * (image2 - image1)`` in float, clipped to 0..255 and truncated to uint8
    (factor 0 gives image1, 1 gives image2, > 1 extrapolates)."""
    a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
    return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def color(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """PIL ``Color``: blend from the image's grey version towards the image."""
    return blend(tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image)), image, factor)


def contrast(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """PIL ``Contrast``: blend from a flat image at the mean grey level (the mean of the uint8
    grey image, truncated to uint8) towards the image."""
    gray = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
    mean = tf.cast(tf.clip_by_value(tf.reduce_mean(gray), 0.0, 255.0), tf.uint8)
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """PIL ``Brightness``: blend from black towards the image."""
    return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float | tf.Tensor) -> tf.Tensor:
    """PIL ``Sharpness``: blend from the image smoothed with PIL's SMOOTH kernel
    ``[[1,1,1],[1,5,1],[1,1,1]] / 13`` (interior pixels only; the 1-pixel border keeps the
    original) towards the image."""
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.cast(tf.clip_by_value(smooth, 0.0, 255.0), tf.uint8)
    interior = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return blend(degenerate, image, factor)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """PIL ``Equalize`` per channel: ``step = (pixels - count of the highest used value) // 255``;
    value ``v`` maps to ``(pixels below v + step // 2) // step`` (clipped to 255); a channel with
    ``step == 0`` is unchanged."""

    def channel(c: tf.Tensor) -> tf.Tensor:
        c = tf.cast(c, tf.int32)
        hist = tf.histogram_fixed_width(c, [0, 255], nbins=256)
        used = tf.boolean_mask(hist, hist > 0)
        step = (tf.reduce_sum(used) - used[-1]) // 255
        below = tf.cumsum(hist, exclusive=True)
        lut = tf.clip_by_value((below + step // 2) // tf.maximum(step, 1), 0, 255)
        return tf.cast(tf.where(step > 0, tf.gather(lut, c), c), tf.uint8)

    return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """PIL ``AutoContrast`` per channel: stretch ``[lo, hi]`` to ``[0, 255]`` (truncated); a flat
    channel is unchanged."""

    def channel(c: tf.Tensor) -> tf.Tensor:
        lo = tf.cast(tf.reduce_min(c), tf.float32)
        hi = tf.cast(tf.reduce_max(c), tf.float32)
        scale = 255.0 / tf.maximum(hi - lo, 1e-6)
        stretched = tf.clip_by_value(tf.cast(c, tf.float32) * scale - lo * scale, 0.0, 255.0)
        return tf.where(hi > lo, tf.cast(stretched, tf.uint8), c)

    return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def posterize(image: tf.Tensor, bits: int | tf.Tensor) -> tf.Tensor:
    """PIL ``Posterize``: ``(v >> (8 - bits)) << (8 - bits)`` with TF's bitwise shifts (which clamp
    a shift of 8 to 7 for uint8, so ``bits=0`` keeps the top bit, as in automl)."""
    shift = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int | tf.Tensor) -> tf.Tensor:
    """Values ``>= threshold`` become ``255 - v``. The threshold is taken modulo 256, as in
    automl, whose Python-int threshold TF converts to the image's uint8: 256 (level 10) inverts
    every value, 384 (RandAugment's magnitude 15) is 128."""
    threshold = tf.cast(tf.math.floormod(tf.cast(threshold, tf.int32), 256), tf.uint8)
    return tf.where(image < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int | tf.Tensor, threshold: int = 128) -> tf.Tensor:
    """Values ``< threshold`` get ``+ addition`` (clipped to 0..255); others are unchanged."""
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
    return tf.where(image < threshold, added, image)


def cutout(image: tf.Tensor, pad_size: int | tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Fill a ``2 * pad_size`` square (rows ``[cy - pad_size, cy + pad_size)``, same for columns,
    cut at the image border) with ``FILL``; the centre ``(cy, cx)`` is uniform over the pixels."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    cy = tf.random.stateless_uniform([], seed, 0, h, tf.int32)
    cx = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0, w,
                                     tf.int32)
    return fill_rect(image, cy - pad_size, cx - pad_size, cy + pad_size, cx + pad_size)


def fill_rect(image: tf.Tensor, y0, x0, y1, x1, value: int = FILL) -> tf.Tensor:
    """Pixel rows ``[y0, y1)`` x columns ``[x0, x1)`` (clipped to the image) set to ``value``."""
    ys = tf.range(tf.shape(image)[0])[:, None]
    xs = tf.range(tf.shape(image)[1])[None, :]
    inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
    return tf.where(inside[..., None], tf.cast(value, image.dtype), image)


def projective_transform(image: tf.Tensor, transform: list) -> tf.Tensor:
    """Output pixel ``(x, y)`` takes the input at ``((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k)``
    with ``k = c0 x + c1 y + 1`` (``transform = [a0, a1, a2, b0, b1, b2, c0, c1]``, pixel-centre
    coordinates), nearest neighbour; outside the input -> ``FILL``."""
    shape = tf.shape(image)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.cast(tf.stack(transform), tf.float32)[None],
        output_shape=shape[:2], fill_value=float(FILL), interpolation="NEAREST",
        fill_mode="CONSTANT")
    return out[0]


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
    """Content moves ``pixels`` to the left (right for negative ``pixels``)."""
    return projective_transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
    """Content moves ``pixels`` up (down for negative ``pixels``)."""
    return projective_transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
    """Output ``(x, y)`` takes the input at ``(x + level * y, y)``: row ``y`` moves left by
    ``level * y``."""
    return projective_transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
    """Output ``(x, y)`` takes the input at ``(x, y + level * x)``: column ``x`` moves up by
    ``level * x``."""
    return projective_transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
    """Rotate about the image centre ``((w-1)/2, (h-1)/2)``: output ``(x, y)`` takes the input at
    the centre + ``R(-a)`` (offset), i.e. positive ``degrees`` turn the content counter-clockwise
    as displayed (y down), the matrix of ``tfa.image.rotate``."""
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    return projective_transform(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])
