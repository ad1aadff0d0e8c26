"""EfficientDet-Lite3x on COCO with automl's recipe (see configs/default.py)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """``default`` with the model set to efficientdet-lite3x."""
    config = default.get_config()
    config.model.name = "efficientdet-lite3x"
    return config
