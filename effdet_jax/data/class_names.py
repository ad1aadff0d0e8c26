"""Class names per label index from the label space alone, without reading any images.

Prediction needs names for the logits but not the dataset: ``coco90`` / COCO tfds give COCO's
names, a COCO-json folder the ``categories`` of its json (the only file read), the synthetic
``shapes`` set its own names.
"""

from __future__ import annotations

import json

import ml_collections
from absl import logging

from effdet_jax.data.label_map import coco_label_map, from_categories


def _json_categories(path: str) -> list[dict] | None:
    try:
        with open(path) as f:
            return json.load(f).get("categories")
    except (OSError, ValueError, AttributeError):
        return None


def label_names(data_cfg: ml_collections.ConfigDict, num_classes: int) -> tuple[str, ...]:
    """``num_classes`` names, one per label index, for ``config.data`` (its source and label
    space). Slots with no known name are ``class_<i>``."""
    names: tuple[str, ...] = ()
    if data_cfg.source == "coco_json":
        for key in ("eval_annotations", "train_annotations"):
            categories = _json_categories(data_cfg[key]) if data_cfg[key] else None
            if categories:
                names = from_categories(categories, data_cfg.label_space).class_names()
                break
        else:
            logging.warning("no readable categories in config.data.{eval,train}_annotations; "
                            "class names are class_<i>")
    elif data_cfg.source == "shapes":
        from effdet_jax.data.sources.shapes import shapes_label_map

        names = shapes_label_map(num_classes).class_names()
    elif data_cfg.label_space == "coco90" or data_cfg.tfds_name.startswith("coco"):
        names = coco_label_map(data_cfg.label_space).class_names()
    names = tuple(names[:num_classes])
    return names + tuple(f"class_{i}" for i in range(len(names), num_classes))
