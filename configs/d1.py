"""EfficientDet-D1 on COCO with automl's recipe (see configs/default.py)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """``default`` with the model set to efficientdet-d1."""
    config = default.get_config()
    config.model.name = "efficientdet-d1"
    return config
