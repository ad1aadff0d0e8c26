"""A prepared tfds detection dataset (``coco/2017``, ``voc/2007``, ``voc/2012``...) as a Source.

Needs the features ``image`` and ``objects/{bbox,label}`` (bbox yxyx normalised, as tfds'
``BBoxFeature``); ``objects/is_crowd`` (COCO) or ``objects/is_difficult`` (VOC) mark boxes that the
evaluation ignores (class ``-2``); ``image/id`` is used as the image id when present, else a hash of
``image/filename``. Multi-host: process ``i`` of ``n`` reads ``tfds.even_splits(split, n)[i]``.

The eval split's ground truth is the official json when ``config.eval_annotations`` names one
(tfds ``image/id`` = the json's image ``id``), else the evaluator builds it from the examples.
``config.eval_image_info`` (an image-info json such as ``image_info_test-dev2017.json``) keeps
only the images it lists: test-dev is the part of tfds' ``test`` split listed there.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from effdet_jax.data import counts as C
from effdet_jax.data.label_map import COCO_CLASS_NAMES, LabelMap, tfds_label_to_category_table
from effdet_jax.data.sources import DataUnavailableError, coco_fixes
from effdet_jax.data.sources.base import Source

log = logging.getLogger(__name__)


class DatasetNotPreparedError(DataUnavailableError):
    """The tfds dataset is not on disk; the message gives the command that prepares it."""


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that downloads and prepares a tfds dataset."""
    dd = f" --data_dir={data_dir}" if data_dir else ""
    cmd = f"tfds build {name}{dd}"
    if name.startswith("coco"):
        cmd += "  (downloads ~25 GB from images.cocodataset.org)"
    return cmd


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"config.data.tfds_name={name!r} is not a tfds dataset: {e}") from e
    return builder


def _not_prepared(name: str, data_dir: str | None, cause: Exception) -> DatasetNotPreparedError:
    where = data_dir or "the default tfds data dir (~/tensorflow_datasets)"
    head = (f"config.data.source='tfds': tfds dataset {name} is not prepared in {where} "
            f"({type(cause).__name__}).\n")
    if name.startswith("coco"):
        return DatasetNotPreparedError(head + coco_fixes(name, data_dir))
    return DatasetNotPreparedError(
        head + "Prepare it with:\n    " + prepare_command(name, data_dir)
        + "\nor use config.data.source='shapes' (synthetic, no download)."
    )


def _split_name(config: ml_collections.ConfigDict, split: str) -> str:
    return config.train_split if split == "train" else config.eval_split


def _open_split(builder: tfds.core.DatasetBuilder, name: str, data_dir: str | None,
                split_name: str) -> tf.data.Dataset:
    try:
        # as_dataset is what fails when the data is missing (``is_prepared`` would also be False
        # under tfds.testing.mock_data, which patches as_dataset only).
        return builder.as_dataset(
            split=split_name, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
        )
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
        if builder.is_prepared():
            raise
        raise _not_prepared(name, data_dir, e) from e


def check_prepared(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
    """Raise ``DatasetNotPreparedError`` (with both ways to get the data) unless ``splits`` of
    ``config.tfds_name`` can be opened; reads no examples."""
    data_dir = config.tfds_data_dir or None
    builder = _builder(config.tfds_name, data_dir)
    for split in splits:
        _open_split(builder, config.tfds_name, data_dir, _split_name(config, split))
    if "eval" in splits:
        for key, what in (("eval_annotations", "the ground truth of the eval split, e.g. "
                           "annotations/instances_val2017.json"),
                          ("eval_image_info", "the image list of the eval split, e.g. "
                           "annotations/image_info_test-dev2017.json")):
            path = config[key]
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise DataUnavailableError(
                    f"config.data.{key}={path!r} is not a readable file ({what}); fix the path "
                    f"or leave it empty (--config.data.{key}=)")


def image_info_ids(path: str) -> list[int]:
    """The image ids listed in a COCO json's ``images`` (image-info or instances json)."""
    try:
        with open(path) as f:
            return sorted({int(im["id"]) for im in json.load(f)["images"]})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"config.data.eval_image_info={path!r}: cannot read the image ids of its "
                         f"'images' list ({type(e).__name__}: {e})") from e


def _listed(ids: list[int]):
    """A tf.data predicate: is the example's ``image/id`` one of ``ids``."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.int64),
                                            tf.ones([len(ids)], tf.int64)), 0)
    return lambda ex: table.lookup(tf.cast(ex["image/id"], tf.int64)) > 0


def _count_listed(builder: tfds.core.DatasetBuilder, split_name: str, ids: list[int]) -> int:
    """Examples of ``split_name`` whose ``image/id`` is in ``ids``, decoding only the ids (the
    eval pipeline pads to whole batches from this count, so it is exact)."""
    ds = builder.as_dataset(split=split_name, shuffle_files=False,
                            decoders=tfds.decode.PartialDecoding({"image/id": True}),
                            read_config=tfds.ReadConfig(try_autocache=False))
    return _count(ds.filter(_listed(ids)))


def _count(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1))


def make_tfds_source(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> Source:
    """``config.tfds_name`` / ``{train,eval}_split`` as a ``Source`` for one process."""
    data_dir = config.tfds_data_dir or None
    builder = _builder(config.tfds_name, data_dir)
    features = builder.info.features
    objects = features["objects"]
    label_feature = objects["label"]
    names = tuple(label_feature.names)
    if config.tfds_name.startswith("coco") and len(names) == len(COCO_CLASS_NAMES):
        names = COCO_CLASS_NAMES  # same classes; tfds' names are missing without its metadata
    table = tfds_label_to_category_table(config.tfds_name, len(names))
    label_map = LabelMap(tuple(int(c) for c in table), names, config.label_space)
    label_of_tfds = tf.constant([label_map.label_of_category(int(c)) for c in table], tf.int32)

    split_name = _split_name(config, split)
    shard = tfds.even_splits(split_name, n=process_count)[process_index] if process_count > 1 \
        else split_name
    records = _open_split(builder, config.tfds_name, data_dir, shard)
    if builder.info.splits:
        num = int(builder.info.splits[shard].num_examples)
        total = int(builder.info.splits[split_name].num_examples)
    else:  # no split metadata (e.g. tfds mock data): count the records once
        num = _count(records)
        total = num if process_count == 1 else _count(builder.as_dataset(split=split_name))
    has_id = "image/id" in features
    gt_annotations = None
    if split == "eval":
        gt_annotations = config.eval_annotations or config.eval_image_info or None
        if config.eval_image_info:
            if not has_id:
                raise ValueError(f"config.data.eval_image_info needs image ids, but tfds "
                                 f"{config.tfds_name} has no 'image/id' feature")
            ids = image_info_ids(config.eval_image_info)
            records = records.filter(_listed(ids))
            num = _count_listed(builder, shard, ids)
            total = num if process_count == 1 else _count_listed(builder, split_name, ids)
            if total < len(ids):
                log.warning("%d of the %d images listed in %s are not in tfds %s split %r: they "
                            "get no detections", len(ids) - total, len(ids),
                            config.eval_image_info, config.tfds_name, split_name)
    crowd_key = next((k for k in ("is_crowd", "is_difficult") if k in objects), None)

    def decode(ex: dict) -> dict:
        obj = ex["objects"]
        # All per-object tensors must agree in length; take the common prefix if they do not.
        n = tf.shape(obj["bbox"])[0]
        n = tf.minimum(n, tf.shape(obj["label"])[0])
        if crowd_key:
            n = tf.minimum(n, tf.shape(obj[crowd_key])[0])
        labels = tf.cast(obj["label"][:n], tf.int32)
        known = (labels >= 0) & (labels < len(names))
        classes = tf.where(known, tf.gather(label_of_tfds, tf.clip_by_value(labels, 0,
                                                                            len(names) - 1)), -1)
        crowd = tf.cast(obj[crowd_key][:n], tf.bool) if crowd_key else tf.zeros([n], tf.bool)
        if has_id:
            image_id = tf.cast(ex["image/id"], tf.int64)
        else:
            image_id = tf.strings.to_hash_bucket_fast(ex["image/filename"], 2**53)
        return {
            "image": ex["image"],
            "boxes": tf.reshape(tf.cast(obj["bbox"][:n], tf.float32), [-1, 4]),
            "classes": classes,
            "is_crowd": crowd,
            "image_id": image_id,
            "readable": tf.constant(True),
            "counts": C.zero_counts(),
        }

    return Source(records=records, num_records=num, decode=decode, label_map=label_map,
                  gt_annotations=gt_annotations, total_records=total)
