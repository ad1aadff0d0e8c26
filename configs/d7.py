"""EfficientDet-D7 on COCO with automl's recipe (see configs/default.py)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """``default`` with the model set to efficientdet-d7."""
    config = default.get_config()
    config.model.name = "efficientdet-d7"
    return config
