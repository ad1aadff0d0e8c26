"""Detection core: anchors, box coding, target assignment, losses and post-processing.

Everything between the network's raw per-level outputs and a trained detector or a list of boxes;
all of it is pure JAX on fixed shapes, so it runs inside ``jax.jit`` and shards with the batch.
"""

from effdet_jax.detection.anchors import (
    AnchorConfig,
    generate_anchors,
    num_anchors,
    num_anchors_per_level,
    num_anchors_per_location,
)
from effdet_jax.detection.box_coder import decode, encode
from effdet_jax.detection.losses import LossConfig, detection_loss, l2_regularization
from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.detection.targets import (
    assign_targets,
    flatten_level_outputs,
    split_levels,
)

__all__ = [
    "AnchorConfig",
    "LossConfig",
    "PostprocessConfig",
    "assign_targets",
    "decode",
    "detection_loss",
    "encode",
    "flatten_level_outputs",
    "generate_anchors",
    "l2_regularization",
    "num_anchors",
    "num_anchors_per_level",
    "num_anchors_per_location",
    "postprocess",
    "split_levels",
]
