"""The contract between a data source and the pipeline: ``Source`` and the sharding helpers.

A source yields cheap *records* in a fixed order (an index, or a tfds example) and a ``decode``
function that turns one record into an *example*: a dict of tensors

* ``image``: [H,W,3] uint8 RGB,
* ``boxes``: [N,4] float32 yxyx normalised to the image (may still be bad: the pipeline sanitises),
* ``classes``: [N] int32 label index (``LabelMap``), ``is_crowd``: [N] bool,
* ``image_id``: int64 scalar, ``readable``: bool scalar (False: the file could not be decoded; the
  image is then a 1x1 black placeholder and there are no boxes),
* ``counts``: ``{name: int32}`` source-level counters (see ``counts.COUNT_KEYS``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import tensorflow as tf

from effdet_jax.data.label_map import LabelMap


@dataclasses.dataclass(frozen=True)
class Source:
    """One split of one dataset, already restricted to this process' shard.

    Attributes:
      records: tf.data.Dataset of records in a deterministic order.
      num_records: records in ``records`` (this shard).
      decode: record -> example (see module docstring); traceable by tf.data.
      label_map: category ids <-> label indices, with class names.
      gt_annotations: path of a COCO json with this split's ground truth, or None (then the
        evaluator builds the ground truth from the examples).
      total_records: records of the split over all processes.
    """

    records: tf.data.Dataset
    num_records: int
    decode: Callable[[object], dict]
    label_map: LabelMap
    gt_annotations: str | None = None
    total_records: int = 0


def shard_range(num: int, process_index: int, process_count: int) -> tf.data.Dataset:
    """Indices ``process_index, process_index + process_count, ...`` below ``num`` (int64)."""
    return tf.data.Dataset.range(num).shard(process_count, process_index)


def shard_size(num: int, process_index: int, process_count: int) -> int:
    """How many of ``range(num)`` fall in shard ``process_index`` of ``process_count``."""
    return len(range(process_index, num, process_count))
