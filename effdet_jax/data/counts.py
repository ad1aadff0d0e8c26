"""Names of the per-example / per-batch counters of bad or altered data (one place for them).

Every example carries ``counts``: a dict ``{name: int32 scalar}`` with all of ``COUNT_KEYS``; a
batch carries their sums. Nothing is dropped or fixed without being counted here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

COUNT_KEYS: tuple[str, ...] = (
    # file could not be decoded: replaced by an empty example (train) / skipped (eval)
    "images_unreadable",
    "images_converted",  # grayscale / RGBA / CMYK / palette / 16-bit converted to RGB
    "images_without_objects",  # no usable box left (kept: a valid negative example)
    "boxes_nan_dropped",  # a NaN/inf coordinate (or a malformed bbox entry)
    "boxes_inverted_fixed",  # min > max on an axis: the two coordinates were swapped
    "boxes_clipped",  # a coordinate outside the image was clipped to the border
    "boxes_degenerate_dropped",  # zero width or height (after clipping)
    "boxes_unknown_class_dropped",  # category id not in the label map
    "boxes_crowd_dropped",  # crowd boxes removed from training examples
    "boxes_over_max_dropped",  # beyond max_instances_per_image: the smallest were dropped
    "boxes_cropped_out",  # training crop left a box with zero area (normal augmentation)
    "padding_examples",  # eval batches padded to a fixed size (image_id == -1)
)


def zero_counts() -> dict[str, tf.Tensor]:
    """All counters at 0 (int32 scalars)."""
    return {k: tf.constant(0, tf.int32) for k in COUNT_KEYS}


def with_counts(base: Mapping[str, tf.Tensor], **updates: tf.Tensor) -> dict[str, tf.Tensor]:
    """Copy of ``base`` with ``updates`` added (not replaced) to the named counters."""
    out = dict(base)
    for k, v in updates.items():
        if k not in out:
            raise KeyError(f"unknown counter {k!r}; known: {COUNT_KEYS}")
        out[k] = out[k] + tf.cast(v, tf.int32)
    return out


def accumulate(total: dict[str, int], batch_counts: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Add a batch's counts to a running host-side total (for logging)."""
    for k, v in batch_counts.items():
        total[k] = total.get(k, 0) + int(v)
    return total


def format_counts(total: Mapping[str, int]) -> str:
    """One log line with the non-zero counters, e.g. ``boxes_clipped=3 images_converted=1``."""
    items = [f"{k}={int(v)}" for k, v in total.items() if int(v)]
    return " ".join(items) if items else "no bad or altered data"
