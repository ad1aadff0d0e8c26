"""A COCO-format folder (``instances.json`` + images) as a ``Source``.

The json is parsed once on the host into flat annotation tensors; records are image indices.
``decode`` is TF ops: it reads the file (``tf.io.read_file``) and decodes it with
``tf_decode.decode_rgb_tf``, except for the files the header scan (``report.read_headers``, shared
with the data report) marks as not TF-decodable (``image_io.tf_decodable``: CMYK JPEG, 16-bit
PNG, TIFF, truncated files, unreadable files...), which ``tf.cond`` sends to PIL
(``image_io.decode_rgb``) inside ``tf.numpy_function``; so does a file TF ops fail on although its
header looked whole (caught by ``ignore_errors`` on a one-element dataset, never stopping the
pipeline). Both routes give the same pixels; a file is counted ``images_converted`` by its PIL
mode either way, and ``images_unreadable`` when PIL cannot decode it either. Category ids are
the dataset's own, mapped to label indices by the ``LabelMap`` (``label_space``).
"""

from __future__ import annotations

import json
import logging
import os
import threading

import ml_collections
import numpy as np
import tensorflow as tf

from effdet_jax.data import counts as C
from effdet_jax.data.box_rules import as_int, parse_bbox
from effdet_jax.data.image_io import UnreadableImageError, is_converted, read_rgb
from effdet_jax.data.label_map import LabelMap, from_categories
from effdet_jax.data.report import read_headers
from effdet_jax.data.sources import DataUnavailableError, coco_fixes
from effdet_jax.data.sources.base import Source, shard_range, shard_size
from effdet_jax.data.tf_decode import DECODES_WEBP, decode_rgb_tf

log = logging.getLogger(__name__)


def read_coco_json(path: str) -> dict:
    """The parsed COCO json at ``path``; ``ValueError`` naming the file when it cannot be read or
    has no ``images`` / ``categories`` list."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read COCO annotations {path}: {e}") from e
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path} has no {key!r} list (not a COCO json)")
    return data


class CocoJsonIndex:
    """Per-image annotation arrays of a COCO json, ready for ``decode``.

    Attributes:
      paths: image file path per image.
      image_ids: COCO image id per image (int64).
      boxes: per image, [N,4] float64 ``[x, y, w, h]`` in pixels (NaN rows for malformed entries).
      category_ids: per image, [N] int64.
      is_crowd: per image, [N] bool.
      label_map: categories of the json.
      tf_decodable: [num_images] bool, the file decodes with TF ops (else PIL).
      converted: [num_images] bool, the file's PIL mode is not RGB (for TF-decoded files).
    """

    def __init__(self, annotations_path: str, image_dir: str, label_space: str = "contiguous"):
        data = read_coco_json(annotations_path)
        self.label_map: LabelMap = from_categories(data["categories"], label_space)
        images = data["images"]
        row = {int(im["id"]): i for i, im in enumerate(images)}
        per_image: list[list[dict]] = [[] for _ in images]
        for ann in data.get("annotations", []):
            i = row.get(as_int(ann.get("image_id")))
            if i is None:
                log.warning("%s: annotation %s refers to unknown image_id %s; ignored",
                            annotations_path, ann.get("id"), ann.get("image_id"))
                continue
            per_image[i].append(ann)
        self.paths = [os.path.join(image_dir, im["file_name"]) for im in images]
        self.image_ids = np.asarray([int(im["id"]) for im in images], np.int64)
        self.boxes = [np.asarray([parse_bbox(a) for a in anns], np.float64).reshape(-1, 4)
                      for anns in per_image]
        self.category_ids = [np.asarray([as_int(a.get("category_id")) for a in anns], np.int64)
                             for anns in per_image]
        self.is_crowd = [np.asarray([bool(a.get("iscrowd", 0)) for a in anns], bool)
                         for anns in per_image]
        self.annotations_path = annotations_path
        headers = read_headers(self.paths)
        self.tf_decodable = np.asarray(
            [h.tf_decodable and (h.format != "WEBP" or DECODES_WEBP) for h in headers], bool)
        self.converted = np.asarray([h.error is None and is_converted(h.mode) for h in headers],
                                    bool)
        pil = [f"{os.path.basename(p)} ({h.format} {h.mode})" for p, h
               in zip(self.paths, headers, strict=True) if h.error is None and not h.tf_decodable]
        if pil:
            log.info("%s: %d of %d images are decoded with PIL (TF ops cannot decode them to the "
                     "same pixels), e.g. %s", annotations_path, len(pil), len(self.paths), pil[:5])

    def __len__(self) -> int:
        return len(self.paths)


def check_files(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
    """Raise ``DataUnavailableError`` unless, for each of ``splits``, the annotations json is a
    readable file and the image folder a readable directory; parses nothing."""
    problems = []
    for split in splits:
        ann_key, img_key = f"{split}_annotations", f"{split}_images"
        ann, img = config[ann_key], config[img_key]
        if not (os.path.isfile(ann) and os.access(ann, os.R_OK)):
            problems.append(f"config.data.{ann_key}={ann!r} is not a readable file "
                            f"(the COCO json of the {split} split)")
        if not (os.path.isdir(img) and os.access(img, os.R_OK | os.X_OK)):
            problems.append(f"config.data.{img_key}={img!r} is not a readable folder "
                            f"(the images of the {split} split)")
    if problems:
        raise DataUnavailableError(
            "config.data.source='coco_json': " + "; ".join(problems) + ".\n" + coco_fixes()
        )


def make_coco_json_source(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> Source:
    """``config.{train,eval}_annotations`` + ``_images`` as a ``Source``."""
    ann = config.train_annotations if split == "train" else config.eval_annotations
    img_dir = config.train_images if split == "train" else config.eval_images
    index = CocoJsonIndex(ann, img_dir, config.label_space)
    return Source(
        records=shard_range(len(index), process_index, process_count),
        num_records=shard_size(len(index), process_index, process_count),
        decode=make_decode(index, strict=config.on_bad_data == "error"),
        label_map=index.label_map,
        gt_annotations=ann,
        total_records=len(index),
    )


def _flat(index: CocoJsonIndex) -> dict[str, tf.Tensor]:
    """The index's per-image annotations as flat constants: ``boxes`` [total,4] float64
    ``[x, y, w, h]`` pixels, ``labels`` [total] int32 (-1: unknown category), ``crowd`` [total]
    bool; image ``i``'s rows are ``row_splits[i]:row_splits[i+1]``."""
    lookup = index.label_map.category_lookup()
    lengths = [len(c) for c in index.category_ids]
    cats = np.concatenate([np.zeros(0, np.int64), *index.category_ids])
    return {
        "boxes": tf.constant(np.concatenate([np.zeros((0, 4)), *index.boxes]), tf.float64),
        "labels": tf.constant(np.asarray([lookup.get(int(c), -1) for c in cats], np.int32)),
        "crowd": tf.constant(np.concatenate([np.zeros(0, bool), *index.is_crowd])),
        "row_splits": tf.constant(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)),
    }


def make_decode(index: CocoJsonIndex, strict: bool = False):
    """record (int64 image index) -> example dict (see ``sources/base.py``), TF ops except for
    files that are not ``index.tf_decodable`` or that TF ops fail to decode.

    A file that cannot be decoded becomes an empty example (counted ``images_unreadable``), or,
    with ``strict`` (``on_bad_data="error"``), stops the pipeline with an error naming it.
    """
    warned: set[str] = set()
    lock = threading.Lock()
    flat = _flat(index)
    paths = tf.constant(index.paths, tf.string)
    tf_decodable = tf.constant(index.tf_decodable)
    converted_by_header = tf.constant(index.converted)

    def _load_pil(i: np.int64):
        path = index.paths[int(i)]
        try:
            image, converted = read_rgb(path)
        except UnreadableImageError as e:
            if strict:
                raise UnreadableImageError(f"{e} (config.data.on_bad_data='error')") from e
            with lock:
                if path not in warned:  # once per file, not once per epoch
                    warned.add(path)
                    log.warning("%s; the example is replaced by an empty one", e)
            return np.zeros((1, 1, 3), np.uint8), False, False
        return image, True, converted

    def _try_tf(record):
        """(image, decoded): a file TF ops fail on (corrupt data the header scan cannot see,
        a file gone since the scan) gives decoded=False instead of stopping the pipeline."""
        attempt = tf.data.Dataset.from_tensors(paths[record]).map(
            lambda path: (decode_rgb_tf(tf.io.read_file(path)), True)).ignore_errors()
        failed = tf.data.Dataset.from_tensors((tf.zeros([1, 1, 3], tf.uint8), False))
        return attempt.concatenate(failed).take(1).get_single_element()

    def _pil(record):
        image, readable, converted = tf.numpy_function(
            _load_pil, [record], (tf.uint8, tf.bool, tf.bool), stateful=False)
        image.set_shape([None, None, 3])
        readable.set_shape([])
        converted.set_shape([])
        return image, readable, converted

    def decode(record: tf.Tensor) -> dict:
        image, decoded = tf.cond(tf_decodable[record], lambda: _try_tf(record),
                                 lambda: (tf.zeros([1, 1, 3], tf.uint8), False))
        # PIL for the files routed to it and for those TF ops failed on (PIL then decodes,
        # or reports the file unreadable, or raises with on_bad_data="error", as for any file).
        image, readable, converted = tf.cond(
            decoded, lambda: (image, tf.constant(True), converted_by_header[record]),
            lambda: _pil(record))
        start = flat["row_splits"][record]
        end = tf.where(readable, flat["row_splits"][record + 1], start)  # unreadable: no boxes
        shape = tf.cast(tf.shape(image)[:2], tf.float64)  # the decoded size wins over the json's
        h, w = shape[0], shape[1]
        x, y, bw, bh = tf.unstack(flat["boxes"][start:end], axis=-1)
        boxes = tf.cast(tf.stack([y / h, x / w, (y + bh) / h, (x + bw) / w], axis=-1), tf.float32)
        return {
            "image": image,
            "boxes": tf.reshape(boxes, [-1, 4]),
            "classes": flat["labels"][start:end],
            "is_crowd": flat["crowd"][start:end],
            "image_id": tf.gather(tf.constant(index.image_ids), record),
            "readable": readable,
            "counts": C.with_counts(
                C.zero_counts(),
                images_unreadable=tf.cast(~readable, tf.int32),
                images_converted=tf.cast(converted, tf.int32),
            ),
        }

    return decode
