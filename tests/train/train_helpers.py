"""Shared helpers of the trainer tests: tiny configs, deterministic random batches, tree diffs."""

import pathlib

import jax
import numpy as np

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**train_overrides):
    """``configs/tiny.py`` (a thin d0 at 64 px); ``train_overrides`` go into ``config.train``."""
    config = tiny.get_config()
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def random_batch(batch_size: int, image_size: int, num_classes: int, seed: int) -> dict:
    """Host numpy batch in the pipeline's layout: images, yxyx pixel boxes, 0-based classes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    num_boxes = 6
    yx = rng.uniform(0, image_size * 0.6, size=(batch_size, num_boxes, 2))
    hw = rng.uniform(image_size * 0.1, image_size * 0.4, size=(batch_size, num_boxes, 2))
    boxes = np.concatenate([yx, yx + hw], axis=-1).astype(np.float32)
    classes = rng.integers(0, num_classes, size=(batch_size, num_boxes)).astype(np.int32)
    classes[:, 4:] = -1  # padding rows
    boxes[:, 4:] = -1.0
    return {"images": images, "boxes": boxes, "classes": classes}


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over two pytrees of equal structure."""
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        if np.size(x)
        else 0.0,
        jax.device_get(a),
        jax.device_get(b),
    )
    return max(jax.tree.leaves(diffs), default=0.0)
