"""The eval pipeline's letterbox as the tests' reference for exported letterboxing graphs."""

import numpy as np


def eval_pipeline_letterbox(images: np.ndarray, normalization, size: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """``data.transforms.resize_crop_pad`` (TF) on each uint8 ``[B, H, W, 3]`` image after the
    model's ``normalization`` (``(mean_rgb, stddev_rgb)``), stacked: ``([B, size, size, 3]``
    float32, ``image_scale [B]``: input pixels per network-input pixel)."""
    import tensorflow as tf

    from effdet_jax.data.transforms import normalize_image, resize_crop_pad

    out, scales = [], []
    for image in images:
        x, _, scale = resize_crop_pad(normalize_image(tf.constant(image), normalization),
                                      tf.zeros([0, 4]), size)
        out.append(x.numpy())
        scales.append(float(scale))
    return np.stack(out), np.asarray(scales, np.float32)
