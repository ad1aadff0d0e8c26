"""Class-label bookkeeping: one place that maps dataset category ids <-> 0-based logit indices.

Three id spaces meet here:

* **dataset category id**: what the annotation file or the COCO results JSON uses. COCO uses
  1..90 with gaps (80 classes); a custom COCO-json folder may use anything.
* **label index** (a.k.a. logit index): the 0-based class in arrays fed to the network and
  returned by post-processing. ``-1`` marks padding, ``-2`` crowd (``PADDING``, ``CROWD`` in
  ``effdet_jax.detection.targets``, which consumes them).
* **tfds label**: ``tfds`` ``coco/2017`` labels are 0..79 (contiguous over the 80 classes).

Two label spaces are supported (``config.data.label_space``):

* ``"contiguous"``: label index = position of the category in the sorted category-id list
  (80 classes for COCO).
* ``"coco90"``: label index = category_id - 1, ``num_classes = 90``, as the official
  automl / effdet checkpoints; only valid for category ids in 1..90.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

LABEL_SPACES = ("contiguous", "coco90")

# COCO 2017 detection categories (ids 1..90 with gaps) and their names, in id order.
COCO_CATEGORY_IDS: tuple[int, ...] = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)
COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
assert len(COCO_CATEGORY_IDS) == len(COCO_CLASS_NAMES) == 80


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Maps dataset category ids to label indices and back.

    Attributes:
      category_ids: dataset category ids, sorted ascending (one per class present in the data).
      names: class name per entry of ``category_ids``.
      label_space: ``"contiguous"`` or ``"coco90"`` (see module docstring).
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    label_space: str = "contiguous"

    def __post_init__(self) -> None:
        if self.label_space not in LABEL_SPACES:
            raise ValueError(f"label_space={self.label_space!r}; allowed: {LABEL_SPACES}")
        if len(self.category_ids) != len(self.names):
            raise ValueError("category_ids and names differ in length")
        if list(self.category_ids) != sorted(set(self.category_ids)):
            raise ValueError(f"category ids must be unique and sorted: {self.category_ids}")
        if self.label_space == "coco90" and any(not 1 <= c <= 90 for c in self.category_ids):
            raise ValueError(
                "label_space='coco90' needs category ids in 1..90 (logit = id - 1); got "
                f"{[c for c in self.category_ids if not 1 <= c <= 90][:5]}; "
                "use label_space='contiguous'"
            )

    @property
    def num_classes(self) -> int:
        """Number of logits the classification head needs."""
        return 90 if self.label_space == "coco90" else len(self.category_ids)

    def label_of_category(self, category_id: int) -> int:
        """Label index of a dataset category id (KeyError for an unknown id)."""
        if self.label_space == "coco90":
            if category_id not in self.category_ids:
                raise KeyError(category_id)
            return int(category_id) - 1
        return self.category_ids.index(int(category_id))

    def category_lookup(self) -> dict[int, int]:
        """``{category_id: label_index}`` for every known category."""
        return {c: self.label_of_category(c) for c in self.category_ids}

    def category_of_labels(self, labels: np.ndarray) -> np.ndarray:
        """Vectorised inverse map: label indices [...] -> dataset category ids [...] (int64)."""
        labels = np.asarray(labels, np.int64)
        if self.label_space == "coco90":
            return labels + 1
        table = np.asarray(self.category_ids, np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
            raise ValueError(
                f"label index outside 0..{len(table) - 1}: {labels.min()}..{labels.max()}")
        return table[labels]

    def class_names(self) -> tuple[str, ...]:
        """Name for each label index 0..num_classes-1 (unused coco90 slots are ``"class_<i>"``)."""
        out = [f"class_{i}" for i in range(self.num_classes)]
        for cid, name in zip(self.category_ids, self.names, strict=True):
            out[self.label_of_category(cid)] = name
        return tuple(out)

    def categories_json(self) -> list[dict]:
        """COCO ``categories`` list (id, name) for building a ground-truth json."""
        pairs = zip(self.category_ids, self.names, strict=True)
        return [{"id": int(c), "name": n} for c, n in pairs]


def coco_label_map(label_space: str = "contiguous") -> LabelMap:
    """The 80-class COCO 2017 map."""
    return LabelMap(COCO_CATEGORY_IDS, COCO_CLASS_NAMES, label_space)


def tfds_label_to_category_table(tfds_name: str, num_tfds_labels: int) -> np.ndarray:
    """Category id for each tfds label 0..n-1: COCO ids for ``coco/*``, else ``label + 1``."""
    if tfds_name.startswith("coco"):
        if num_tfds_labels != 80:
            raise ValueError(f"{tfds_name} has {num_tfds_labels} labels; expected COCO's 80")
        return np.asarray(COCO_CATEGORY_IDS, np.int64)
    return np.arange(1, num_tfds_labels + 1, dtype=np.int64)


def from_categories(categories: Sequence[dict], label_space: str = "contiguous") -> LabelMap:
    """Label map from a COCO json ``categories`` list (``{"id", "name"}`` dicts, any order)."""
    cats = sorted(categories, key=lambda c: int(c["id"]))
    ids = tuple(int(c["id"]) for c in cats)
    names = tuple(str(c.get("name", f"category_{c['id']}")) for c in cats)
    return LabelMap(ids, names, label_space)
