"""Decoding encoded images to RGB uint8 with TensorFlow ops (no Python per example).

``decode_rgb_tf`` gives ``image_io.decode_rgb``'s pixels for the files ``image_io.tf_decodable``
accepts: JPEG through libjpeg-turbo's accurate integer IDCT (``INTEGER_ACCURATE``, PIL's method;
TF's default, and ``tf.io.decode_image``'s, is the fast IDCT, which differs by up to about 12 grey
levels), PNG / GIF (first frame) / BMP / WebP through ``tf.io.decode_image``. Grayscale, grey +
alpha, palette and RGBA files come out as 3 channels the way PIL's ``convert("RGB")`` makes them
(grey replicated, palette looked up, alpha dropped); EXIF orientation is ignored, as by PIL here.
"""

from __future__ import annotations

import tensorflow as tf

# tf.io.decode_image reads WebP from TF 2.18 on; with an older TF, WebP files go through PIL.
DECODES_WEBP: bool = hasattr(tf.io, "decode_webp")


def decode_rgb_tf(contents: tf.Tensor) -> tf.Tensor:
    """Encoded file bytes (string scalar) -> [height, width, 3] uint8 RGB image."""
    image = tf.cond(
        tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(contents, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image
