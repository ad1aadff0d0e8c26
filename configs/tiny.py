"""A tiny EfficientDet on 64-px synthetic shapes: seconds per step on a CPU.

For tests and smoke runs of the whole trainer (``python main.py --config=configs/tiny.py``); it
learns nothing useful. ``configs/shapes.py`` is the small config that actually trains.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """``default`` shrunk: d0 backbone, one thin BiFPN cell and head on P3-P5, 64-px input."""
    config = default.get_config()
    config.model.name = "efficientdet-d0"
    config.model.num_classes = 4
    config.model.image_size = 64
    config.model.overrides = ml_collections.ConfigDict(
        # P3-P5 only: the model needs image_size >= 2**max_level.
        {"fpn_num_filters": 16, "fpn_cell_repeats": 1, "box_class_repeats": 1, "max_level": 5,
         # 7-block quarter-width backbone: same code paths, a fraction of the compile time.
         "backbone_overrides": {"width_coefficient": 0.25, "depth_coefficient": 0.25}}
    )
    # The synthetic set is drawn for this model: one shape class per logit, images the size of
    # the input. References, so an override of model.num_classes / model.image_size moves both.
    config.data.source = "shapes"
    config.data.label_space = "contiguous"
    config.data.shapes.num_classes = config.model.get_ref("num_classes")
    config.data.shapes.image_size = config.model.get_ref("image_size")
    config.data.shapes.num_train = 64
    config.data.shapes.num_eval = 16
    config.data.shuffle_buffer = 64
    config.data.num_parallel_calls = 1

    config.train.batch_size = 8
    config.train.total_steps = 6
    config.train.num_examples_per_epoch = 64
    config.train.lr_warmup_epochs = 0.25
    # Constant after warm-up: the run length then does not enter the compiled step, so runs of
    # different lengths (tests, restarts) share one cached executable.
    config.train.lr_schedule = "constant"
    config.eval.batch_size = 8
    config.eval.every_steps = 1000
    config.eval.num_summary_images = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = True
    config.log_every_steps = 1
    config.mesh.shard_min_size = 1024  # so tiny arrays still get sharded on 8 devices
    return config
