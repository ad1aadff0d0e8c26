"""Image + box transforms of automl's ``DetectionInputProcessor`` (tf ops, used inside tf.data).

Conventions: images are HWC; ``boxes_norm`` are [N,4] yxyx normalised to the current image;
pixel boxes are yxyx in pixel-edge coordinates of the network input (a box covering the whole
S x S input is ``[0, 0, S, S]``). Padding is bottom-right, with zeros in normalised space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from effdet_jax.detection.targets import PADDING

# ``(mean_rgb, stddev_rgb)``, 3 values each in uint8 pixel units: the model's input normalisation
# (``EfficientDetConfig.normalization``; the model table holds it per model, as automl does).
Normalization = tuple[Sequence[float], Sequence[float]]


def normalize_image(image: tf.Tensor, normalization: Normalization) -> tf.Tensor:
    """uint8 [H,W,3] RGB -> float32 ``(u8 - mean_rgb) / stddev_rgb`` per channel."""
    mean_rgb, stddev_rgb = normalization
    image = tf.cast(image, tf.float32)
    return (image - tf.constant(mean_rgb, tf.float32)) / tf.constant(stddev_rgb, tf.float32)


def denormalize_image(
    image: tf.Tensor | np.ndarray, normalization: Normalization
) -> tf.Tensor | np.ndarray:
    """Inverse of ``normalize_image`` with the same ``normalization`` (float, not rounded or
    clipped), for a tf tensor (inside tf.data) or a numpy / jax array (images of a batch on the
    host)."""
    mean_rgb, stddev_rgb = normalization
    return image * np.asarray(stddev_rgb, np.float32) + np.asarray(mean_rgb, np.float32)


def random_horizontal_flip(
    image: tf.Tensor, boxes_norm: tf.Tensor, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Flip left-right with probability 1/2 (``seed``: [2] int stateless seed)."""
    flip = tf.random.stateless_uniform([], seed) < 0.5

    def _flip():
        y0, x0, y1, x1 = tf.unstack(boxes_norm, 4, axis=-1)
        return tf.image.flip_left_right(image), tf.stack([y0, 1.0 - x1, y1, 1.0 - x0], axis=-1)

    return tf.cond(flip, _flip, lambda: (image, boxes_norm))


def resize_crop_pad(
    image: tf.Tensor,
    boxes_norm: tf.Tensor,
    output_size: int,
    scale_factor: tf.Tensor | float = 1.0,
    crop_fraction: tf.Tensor | tuple[float, float] = (0.0, 0.0),
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Aspect-preserving resize to ``scale_factor * output_size``, crop, pad to ``output_size``.

    The image is resized (bilinear) so its longer side is ``scale_factor * output_size``; when it
    is then larger than the output on an axis, a window starting at ``crop_fraction * excess`` is
    cut; then it is padded bottom-right with zeros to ``output_size`` squared.

    Args:
      image: [H,W,3] float32 (normalised).
      boxes_norm: [N,4] yxyx normalised to the image.
      output_size: S.
      scale_factor: 1.0 for eval; random in [jitter_min, jitter_max] for training.
      crop_fraction: (fy, fx) in [0,1] choosing the crop window (0 for eval).

    Returns:
      (image [S,S,3], boxes [N,4] yxyx pixels of the output, clipped to [0,S] but not filtered,
      image_scale: float32 scalar, original pixels per output pixel).

    As in automl, the resized size is truncated to whole pixels and boxes follow the resized
    pixels exactly; mapping back with ``image_scale`` is exact on the longer axis and off by less
    than one output pixel on the shorter one.
    """
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    target = tf.cast(scale_factor, tf.float32) * float(output_size)
    scale = tf.minimum(target / h, target / w)
    scaled_h = tf.maximum(tf.cast(h * scale, tf.int32), 1)
    scaled_w = tf.maximum(tf.cast(w * scale, tf.int32), 1)
    fy, fx = crop_fraction[0], crop_fraction[1]
    off_y = tf.cast(tf.cast(tf.maximum(scaled_h - output_size, 0), tf.float32) * fy, tf.int32)
    off_x = tf.cast(tf.cast(tf.maximum(scaled_w - output_size, 0), tf.float32) * fx, tf.int32)

    resized = tf.image.resize(image, tf.stack([scaled_h, scaled_w]), method="bilinear")
    cropped = resized[off_y : off_y + output_size, off_x : off_x + output_size, :]
    out = tf.image.pad_to_bounding_box(cropped, 0, 0, output_size, output_size)

    size = tf.cast(tf.stack([scaled_h, scaled_w, scaled_h, scaled_w]), tf.float32)
    offset = tf.cast(tf.stack([off_y, off_x, off_y, off_x]), tf.float32)
    boxes = tf.clip_by_value(boxes_norm * size - offset, 0.0, float(output_size))
    return out, boxes, 1.0 / scale


def nonzero_area(boxes: tf.Tensor) -> tf.Tensor:
    """[N] bool: boxes with positive height and width."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def pad_to_max(
    boxes: tf.Tensor, classes: tf.Tensor, max_instances: int
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Fit one image's boxes into exactly ``max_instances`` rows; the one place that decides
    which boxes a batch keeps.

    Beyond ``max_instances`` boxes, the largest by area are kept, in their original order (equal
    areas keep the earlier box): the json's order is arbitrary, and the smallest boxes are the
    ones the coarse anchor grid matches worst.

    Args:
      boxes: [N,4] yxyx (any units).
      classes: [N] int32.
      max_instances: M.

    Returns:
      (boxes [M,4] padded with -1, classes [M] padded with -1, number of boxes dropped).
    """
    n = tf.shape(boxes)[0]
    dropped = tf.maximum(n - max_instances, 0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = tf.sort(tf.argsort(-area, stable=True)[:max_instances])
    boxes = tf.gather(boxes, keep)
    classes = tf.gather(classes, keep)
    pad = max_instances - tf.shape(boxes)[0]
    boxes = tf.pad(boxes, [[0, pad], [0, 0]], constant_values=-1.0)
    classes = tf.pad(classes, [[0, pad]], constant_values=PADDING)
    boxes.set_shape([max_instances, 4])
    classes.set_shape([max_instances])
    return boxes, classes, dropped
