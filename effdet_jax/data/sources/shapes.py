"""A deterministic synthetic detection set: coloured shapes on textured backgrounds.

Needs no download. Each class is one (shape, colour) pair with distinct hues, so a small model
learns it quickly. Image ``i`` of a split is generated from ``numpy.random.default_rng([seed, i])``,
so any example can be regenerated on its own, in any order, on any host.

Images are H x W with H, W in [0.75, 1] * ``image_size`` (not square, to exercise aspect handling),
2..10 objects (configurable) of 8%..40% of the short side, with limited overlaps (later shapes are
drawn over earlier ones; a box always frames the full shape). Boxes are the tight extent of the
drawn pixels, ``[y_min, x_min, y_max + 1, x_max + 1]`` in pixel-edge coordinates.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import tensorflow as tf

from effdet_jax.data import counts as C
from effdet_jax.data.label_map import LabelMap
from effdet_jax.data.sources.base import Source, shard_range, shard_size

# (name, shape, RGB colour) per class; the hues are far apart.
SHAPE_CLASSES: tuple[tuple[str, str, tuple[int, int, int]], ...] = (
    ("red rectangle", "rectangle", (225, 30, 30)),
    ("green ellipse", "ellipse", (30, 200, 50)),
    ("blue triangle", "triangle", (40, 70, 235)),
    ("yellow ellipse", "ellipse", (235, 215, 30)),
    ("magenta triangle", "triangle", (215, 40, 210)),
    ("cyan rectangle", "rectangle", (30, 215, 215)),
)


def shapes_label_map(num_classes: int) -> LabelMap:
    """Category ids 1..num_classes, names from ``SHAPE_CLASSES``."""
    names = tuple(c[0] for c in SHAPE_CLASSES[:num_classes])
    return LabelMap(tuple(range(1, num_classes + 1)), names, "contiguous")


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-saturation texture: a grey base, soft stripes and pixel noise. float32 [h,w,3]."""
    base = rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 30)
    k = np.float32(2 * np.pi / period)
    yy = np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(angle)) * k
    xx = np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle)) * k
    stripes = np.float32(rng.uniform(5, 20)) * np.sin(yy + xx)
    img = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(6)
    img += stripes[..., None]
    img += base.astype(np.float32)[None, None, :]
    return img


def _shape_mask(kind: str, bh: int, bw: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask [bh,bw] whose tight extent is the full box."""
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32) + 0.5
    if kind == "rectangle":
        return np.ones((bh, bw), bool)
    if kind == "ellipse":
        cy, cx = bh / 2, bw / 2
        m = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1.0
    else:  # triangle: apex on the top edge, base on the bottom edge
        apex = rng.uniform(0.2, 0.8) * bw
        t = yy / bh  # 0 at the top, 1 at the bottom
        left = apex * (1 - t)
        right = apex + (bw - apex) * t
        m = (xx >= left) & (xx <= right)
    m[bh // 2, :] |= kind == "ellipse"  # make sure the extent touches the box edges
    m[:, bw // 2] |= kind == "ellipse"
    return m


def _iou_and_cover(box: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of ``box`` with each of ``others``, and the fraction of each other box it covers."""
    y0 = np.maximum(box[0], others[:, 0])
    x0 = np.maximum(box[1], others[:, 1])
    y1 = np.minimum(box[2], others[:, 2])
    x1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + areas - inter), inter / areas


def generate_shapes_example(
    seed: int, index: int, image_size: int, num_classes: int, min_objects: int, max_objects: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of the set with ``seed``.

    Returns:
      (image [H,W,3] uint8, boxes [N,4] float32 yxyx pixel edges, classes [N] int32 0-based).
    """
    rng = np.random.default_rng([seed, index])
    h = int(rng.integers(int(0.75 * image_size), image_size + 1))
    w = int(rng.integers(int(0.75 * image_size), image_size + 1))
    img = _background(rng, h, w)
    n = int(rng.integers(min_objects, max_objects + 1))
    short = min(h, w)
    boxes: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(n):
        for _attempt in range(30):
            bh = int(rng.uniform(0.08, 0.4) * short)
            bw = int(rng.uniform(0.08, 0.4) * short)
            bh, bw = max(bh, 4), max(bw, 4)
            y0 = int(rng.integers(0, h - bh + 1))
            x0 = int(rng.integers(0, w - bw + 1))
            box = np.array([y0, x0, y0 + bh, x0 + bw], np.float32)
            if boxes:
                iou, cover = _iou_and_cover(box, np.stack(boxes))
                if iou.max() > 0.3 or cover.max() > 0.5:
                    continue
            cls = int(rng.integers(0, num_classes))
            _, kind, colour = SHAPE_CLASSES[cls]
            mask = _shape_mask(kind, bh, bw, rng)
            tint = np.asarray(colour, np.float32) + rng.uniform(-20, 20, size=3)
            shade = rng.uniform(0.85, 1.0)
            patch = img[y0 : y0 + bh, x0 : x0 + bw]
            patch[mask] = np.clip(tint * shade, 0, 255)
            ys, xs = np.nonzero(mask)
            boxes.append(
                np.array([y0 + ys.min(), x0 + xs.min(), y0 + ys.max() + 1, x0 + xs.max() + 1],
                         np.float32)
            )
            classes.append(cls)
            break
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return (
        image,
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int32),
    )


def make_shapes_source(
    config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int
) -> Source:
    """The synthetic set as a ``Source`` (records are image indices)."""
    s = config.shapes
    num = s.num_train if split == "train" else s.num_eval
    seed = s.train_seed if split == "train" else s.eval_seed
    args = (int(s.image_size), int(s.num_classes), int(s.min_objects), int(s.max_objects))
    # Image ids: distinct per split so train/eval results never mix.
    id_offset = 0 if split == "train" else 10_000_000

    def _gen(index: np.int64):
        image, boxes, classes = generate_shapes_example(seed, int(index), *args)
        hw = np.array(image.shape[:2] * 2, np.float32)
        return image, boxes / hw, classes

    def decode(index: tf.Tensor) -> dict:
        image, boxes, classes = tf.numpy_function(
            _gen, [index], (tf.uint8, tf.float32, tf.int32), stateful=False
        )
        image.set_shape([None, None, 3])
        boxes.set_shape([None, 4])
        classes.set_shape([None])
        return {
            "image": image,
            "boxes": boxes,
            "classes": classes,
            "is_crowd": tf.zeros_like(classes, tf.bool),
            "image_id": index + id_offset,
            "readable": tf.constant(True),
            "counts": C.zero_counts(),
        }

    return Source(
        records=shard_range(num, process_index, process_count),
        num_records=shard_size(num, process_index, process_count),
        decode=decode,
        label_map=shapes_label_map(int(s.num_classes)),
        total_records=num,
    )
