"""EfficientDet-D5 on COCO with automl's recipe (see configs/default.py)."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """``default`` with the model set to efficientdet-d5 and ``model.remat="blocks+heads"``."""
    config = default.get_config()
    config.model.name = "efficientdet-d5"
    # The backward pass recomputes the blocks and the heads' repeats: about 1/8 of the
    # activation memory of remat="none" (benchmarks/RESULTS.md, bench_remat.py).
    config.model.remat = "blocks+heads"
    return config
