"""The automl reference inputs, regenerated from their documented seed.

Both ``common/input.npz`` (d0, 512x512) and ``lite0/input.npz`` (320x320) come from
``np.random.default_rng(12345).integers(0, 256, (2, S, S, 3), dtype=np.uint8)``, normalised in
float32. The regenerated arrays equal the stored ones bit for bit (checked by
``tools/make_compact_automl_reference.py``), so the compact reference copy does not store them.
"""

import numpy as np

INPUT_SEED = 12345
# automl's hparams: ImageNet statistics for efficientdet-d*, 127 / 128 for efficientdet-lite*.
D0_MEAN_RGB = 255.0 * np.array([0.485, 0.456, 0.406])
D0_STDDEV_RGB = 255.0 * np.array([0.229, 0.224, 0.225])
LITE_MEAN, LITE_STDDEV = 127.0, 128.0

IMAGE_SIZES = {"d0": 512, "d0_channel_attn": 512, "lite0": 320}


def random_uint8_images(size: int) -> np.ndarray:
    """[2, size, size, 3] uint8 RGB images from the reference seed."""
    rng = np.random.default_rng(INPUT_SEED)
    return rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def reference_input(model: str) -> np.ndarray:
    """[2, S, S, 3] float32 NHWC normalised input of ``model`` ("d0", "d0_channel_attn", "lite0").

    Normalisation in float32, as automl's ``normalize_image``: ``(u8 - mean) / std`` with the
    mean and std cast to float32 first.
    """
    image = random_uint8_images(IMAGE_SIZES[model]).astype(np.float32)
    if model == "lite0":
        return (image - np.float32(LITE_MEAN)) / np.float32(LITE_STDDEV)
    return (image - D0_MEAN_RGB.astype(np.float32)) / D0_STDDEV_RGB.astype(np.float32)
