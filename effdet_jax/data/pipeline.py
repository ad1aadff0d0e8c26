"""tf.data input pipelines for training and evaluation: fixed-shape numpy batches.

Each batch is a dict of numpy arrays (per process; ``B`` = per-process batch size, ``S`` = image
size, ``M`` = ``config.max_instances_per_image``):

* ``images``: [B,S,S,3] float32 RGB normalised with the model's ``normalization``
  (``(u8 - mean_rgb) / stddev_rgb``), zero-padded bottom-right.
* ``boxes``: [B,M,4] float32 yxyx in pixels of the network input (padding rows are -1).
* ``classes``: [B,M] int32 0-based label index; -1 padding, -2 crowd (ignored by evaluation).
* ``image_id``: [B] int64 (-1 for eval padding examples and unreadable eval images).
* ``image_scale``: [B] float32; network-input pixels * image_scale = original-image pixels.
* ``crowd_classes`` (eval batches only): [B,M] int32 label index of the crowd rows (-1 elsewhere),
  so the evaluator can build crowd ground truth in the right category.
* ``image_hw`` (eval batches only): [B,2] int32 original image height and width in pixels (the
  evaluator clips detections to the image; 0 for padding examples).
* ``counts``: ``{name: int64}`` dropped/fixed items in this batch (``counts.COUNT_KEYS``). Pop it
  before sending the batch to devices (``split_counts``).

**Determinism and resuming.** Training reads the records of this process' shard once per epoch,
shuffled with a seed derived from ``(config.seed, epoch)`` (``reshuffle_each_iteration=False``),
and draws each example's augmentation from a stateless seed derived from ``(config.seed, epoch,
record index)``. Batches never straddle an ambiguity: step ``s`` consumes the examples
``s*B .. s*B+B-1`` of the concatenated epochs (unreadable files become empty examples rather than
being filtered, so the count never drifts). ``make_train_pipeline(..., start_step=s)`` therefore
starts at epoch ``s*B // N`` and skips ``s*B % N`` shuffled records *before* decoding, and yields
exactly the batches a run started at step 0 would yield from step ``s`` on. Only the position
(the step) needs to be checkpointed. For tfds sources the skipped records are still read (tfds
decodes inside ``as_dataset``), at most one epoch of them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from effdet_jax.data import counts as C
from effdet_jax.data.config import validate_data_config
from effdet_jax.data.label_map import LabelMap
from effdet_jax.data.sanitize import sanitize_boxes
from effdet_jax.data.sources import make_source
from effdet_jax.data.sources.base import Source
from effdet_jax.data.transforms import (
    Normalization,
    nonzero_area,
    normalize_image,
    pad_to_max,
    random_horizontal_flip,
    resize_crop_pad,
)
from effdet_jax.detection.targets import CROWD, PADDING

log = logging.getLogger(__name__)


def hide_gpus_from_tf() -> None:
    """Keep TensorFlow off the accelerators (they belong to JAX)."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices: nothing left to change
        pass


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A built input pipeline for one process.

    Attributes:
      dataset: tf.data.Dataset of batches (tensors; iterate ``self`` for numpy).
      label_map: category ids <-> label indices and class names.
      num_examples: examples in this process' shard (without eval padding).
      num_batches: batches per pass (eval, same on every process); None for training (infinite).
      gt_annotations: COCO json of the ground truth, or None (build it from the batches).
      normalization: ``(mean_rgb, stddev_rgb)`` the images were normalised with (drawing them
        de-normalises with it).
    """

    dataset: tf.data.Dataset
    label_map: LabelMap
    num_examples: int
    num_batches: int | None
    gt_annotations: str | None
    normalization: Normalization

    def __iter__(self) -> Iterator[dict]:
        """Numpy batches (see module docstring)."""
        for batch in self.dataset.as_numpy_iterator():
            batch["counts"] = {k: np.int64(v) for k, v in batch["counts"].items()}
            yield batch


def split_counts(batch: dict) -> tuple[dict, dict]:
    """(arrays to shard onto devices, counts to log) of a numpy batch."""
    arrays = {k: v for k, v in batch.items() if k != "counts"}
    return arrays, batch["counts"]


def _seed_for(base_seed: int, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Stateless [2] int32 seed, a function of (base seed, epoch, record index) only."""
    key = tf.constant([base_seed & 0x7FFFFFFF, 0x5EED], tf.int32)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(epoch, tf.int32))
    return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int32))


def _clean(ex: dict, num_classes: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, dict]:
    boxes, classes, crowd, sc = sanitize_boxes(ex["boxes"], ex["classes"], ex["is_crowd"],
                                               num_classes)
    counts = C.with_counts(ex["counts"], **sc)
    no_objects = tf.reduce_sum(tf.cast(~crowd, tf.int32)) == 0
    counts = C.with_counts(counts, images_without_objects=tf.cast(no_objects & ex["readable"],
                                                                  tf.int32))
    return boxes, classes, crowd, counts


def _finish(image, boxes, classes, crowd, image_id, image_scale, counts, max_instances,
            with_crowd_classes=False):
    crowd_classes = tf.where(crowd, classes, PADDING)
    classes = tf.where(crowd, CROWD, classes)
    padded_boxes, padded_classes, over = pad_to_max(boxes, classes, max_instances)
    out = {
        "images": image,
        "boxes": padded_boxes,
        "classes": padded_classes,
        "image_id": tf.cast(image_id, tf.int64),
        "image_scale": tf.cast(image_scale, tf.float32),
        "counts": C.with_counts(counts, boxes_over_max_dropped=over),
    }
    if with_crowd_classes:
        out["crowd_classes"] = pad_to_max(boxes, crowd_classes, max_instances)[1]
    return out


def train_example(
    config: ml_collections.ConfigDict,
    source: Source,
    image_size: int,
    ex: dict,
    seed: tf.Tensor,
    normalization: Normalization,
) -> dict:
    """Decoded example -> augmented training example (one element of a batch), normalised with
    the model's ``(mean_rgb, stddev_rgb)``."""
    num_classes = source.label_map.num_classes
    boxes, classes, crowd, counts = _clean(ex, num_classes)
    if config.skip_crowd_during_training:
        counts = C.with_counts(counts, boxes_crowd_dropped=tf.reduce_sum(tf.cast(crowd, tf.int32)))
        boxes, classes, crowd = (tf.boolean_mask(t, ~crowd) for t in (boxes, classes, crowd))
    seeds = tf.random.experimental.stateless_split(seed, 5)
    image = ex["image"]
    if config.autoaugment_policy or config.randaugment_layers:
        from effdet_jax.data import autoaugment

        # uint8 image and [N,4] yxyx boxes normalised to it, as automl's dataloader passes them.
        image, boxes = autoaugment.distort(
            image, boxes, seeds[0], policy=config.autoaugment_policy,
            randaugment_layers=config.randaugment_layers,
            randaugment_magnitude=config.randaugment_magnitude,
        )
    image = normalize_image(image, normalization)
    if config.hflip:
        image, boxes = random_horizontal_flip(image, boxes, seeds[1])
    factor = tf.random.stateless_uniform([], seeds[2], config.jitter_min, config.jitter_max)
    crop = tf.random.stateless_uniform([2], seeds[3])
    image, boxes, image_scale = resize_crop_pad(image, boxes, image_size, factor, crop)
    keep = nonzero_area(boxes)
    counts = C.with_counts(counts, boxes_cropped_out=tf.reduce_sum(tf.cast(~keep, tf.int32)))
    boxes, classes, crowd = (tf.boolean_mask(t, keep) for t in (boxes, classes, crowd))
    return _finish(image, boxes, classes, crowd, ex["image_id"], image_scale, counts,
                   config.max_instances_per_image)


def eval_example(config: ml_collections.ConfigDict, source: Source, image_size: int,
                 ex: dict, normalization: Normalization) -> dict:
    """Decoded example -> eval example: normalise with the model's ``(mean_rgb, stddev_rgb)``,
    resize keeping the aspect, pad; crowd kept as -2."""
    boxes, classes, crowd, counts = _clean(ex, source.label_map.num_classes)
    image = normalize_image(ex["image"], normalization)
    image, boxes, image_scale = resize_crop_pad(image, boxes, image_size)
    keep = nonzero_area(boxes)  # can only drop boxes that shrank below float precision
    counts = C.with_counts(counts, boxes_degenerate_dropped=tf.reduce_sum(tf.cast(~keep, tf.int32)))
    boxes, classes, crowd = (tf.boolean_mask(t, keep) for t in (boxes, classes, crowd))
    image_id = tf.where(ex["readable"], tf.cast(ex["image_id"], tf.int64),
                        tf.constant(-1, tf.int64))
    out = _finish(image, boxes, classes, crowd, image_id, image_scale, counts,
                  config.max_instances_per_image, with_crowd_classes=True)
    out["image_hw"] = tf.shape(ex["image"], out_type=tf.int32)[:2]
    return out


def _padding_example(image_size: int, max_instances: int) -> dict:
    return {
        "images": tf.zeros([image_size, image_size, 3], tf.float32),
        "boxes": -tf.ones([max_instances, 4], tf.float32),
        "classes": -tf.ones([max_instances], tf.int32),
        "crowd_classes": -tf.ones([max_instances], tf.int32),
        "image_id": tf.constant(-1, tf.int64),
        "image_scale": tf.constant(1.0, tf.float32),
        "image_hw": tf.zeros([2], tf.int32),
        "counts": C.with_counts(C.zero_counts(), padding_examples=1),
    }


def _sum_counts(batch: dict) -> dict:
    batch = dict(batch)
    batch["counts"] = {k: tf.reduce_sum(tf.cast(v, tf.int64)) for k, v in batch["counts"].items()}
    return batch


def _parallel(config) -> int:
    return tf.data.AUTOTUNE if config.num_parallel_calls == -1 else config.num_parallel_calls


def _prefetch(ds: tf.data.Dataset, config) -> tf.data.Dataset:
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.prefetch(tf.data.AUTOTUNE if config.prefetch == -1 else config.prefetch)


def make_train_pipeline(
    config: ml_collections.ConfigDict,
    image_size: int,
    batch_size: int,
    *,
    normalization: Normalization,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Pipeline:
    """Infinite, shuffled, augmented training batches of this process' shard.

    Args:
      config: ``config.data`` (see ``default_data_config``).
      image_size: network input size S (square).
      batch_size: per-process batch size B.
      normalization: the model's ``(mean_rgb, stddev_rgb)`` (``EfficientDetConfig.normalization``).
      process_index, process_count: ``jax.process_index()``, ``jax.process_count()``.
      start_step: first training step to produce (resume); see the module docstring.
    """
    validate_data_config(config)
    hide_gpus_from_tf()
    source = make_source(config, "train", process_index, process_count)
    n = source.num_records
    if n == 0:
        raise ValueError(f"training split of {config.source} has no examples for process "
                         f"{process_index}/{process_count}")
    start_epoch, offset = divmod(int(start_step) * batch_size, n)
    base_seed = int(config.seed)
    buffer = int(min(config.shuffle_buffer, n))

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        seed = tf.cast(epoch, tf.int64) * 1_000_003 + base_seed
        ds = source.records.enumerate().shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
        ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(offset, tf.int64), 0))
        return ds.map(lambda i, r: (epoch, i, r))

    def process(epoch, index, record):
        seed = _seed_for(base_seed, epoch, index)
        return train_example(config, source, image_size, source.decode(record), seed,
                             normalization)

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_records)
    ds = ds.map(process, num_parallel_calls=_parallel(config), deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).map(_sum_counts)
    return Pipeline(_prefetch(ds, config), source.label_map, n, None, source.gt_annotations,
                    normalization)


def make_eval_pipeline(
    config: ml_collections.ConfigDict,
    image_size: int,
    batch_size: int,
    *,
    normalization: Normalization,
    process_index: int = 0,
    process_count: int = 1,
) -> Pipeline:
    """One pass over the eval split of this process' shard, in order, padded to whole batches.

    Every process yields the same number of batches (``num_batches``); padding examples have
    ``image_id == -1`` and only padding boxes. ``normalization``: the model's
    ``(mean_rgb, stddev_rgb)`` (``EfficientDetConfig.normalization``).
    """
    validate_data_config(config)
    hide_gpus_from_tf()
    source = make_source(config, "eval", process_index, process_count)
    n = source.num_records
    # Shards differ by at most one record, so ceil(total / count) bounds every shard and is the
    # same number on every process.
    largest = math.ceil(source.total_records / process_count)
    num_batches = max(1, math.ceil(largest / batch_size))
    pad = num_batches * batch_size - n

    ds = source.records.map(
        lambda r: eval_example(config, source, image_size, source.decode(r), normalization),
        num_parallel_calls=_parallel(config), deterministic=True,
    )
    if config.cache_eval:
        ds = ds.cache()
    padding = tf.data.Dataset.range(pad).map(
        lambda _: _padding_example(image_size, config.max_instances_per_image))
    ds = ds.concatenate(padding).batch(batch_size, drop_remainder=True).map(_sum_counts)
    return Pipeline(_prefetch(ds, config), source.label_map, n, num_batches,
                    source.gt_annotations, normalization)
