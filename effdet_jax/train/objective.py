"""The training objective: targets from ground truth, detection losses and the L2 term.

Glue over ``effdet_jax.detection``; it only decides which of its functions run, in which order,
and where the anchors come from (the model config). The losses cast outputs to float32 themselves,
so bfloat16 models keep float32 losses.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from effdet_jax.detection import anchors, losses, targets

LossFn = Callable[[list, list, dict, Any], tuple[jax.Array, dict[str, jax.Array]]]


def anchors_for(model_config) -> jax.Array:
    """[num_anchors, 4] yxyx pixel anchors for a model config (level, y, x, anchor order)."""
    return jnp.asarray(anchors.generate_anchors(model_config.anchor_config()))


def make_loss_fn(model_config, loss_cfg: ml_collections.ConfigDict, num_classes: int) -> LossFn:
    """``loss_fn(cls_outputs, box_outputs, batch, params) -> (total, parts)``.

    ``cls_outputs``/``box_outputs`` are the model's per-level lists; ``batch`` holds ``boxes``
    [B, M, 4] yxyx pixels and ``classes`` [B, M] int32 (0-based, -1 padding, -2 crowd). Targets
    are assigned on device, inside the jitted step. ``total`` includes the L2 term on ``params``'
    kernels; ``parts`` are ``detection.losses.detection_loss``'s (``cls_loss``, ``box_loss``,
    ``box_iou_loss``, ``det_loss``, ``reg_l2_loss``, ``num_positives_sum``).
    """
    anchor_boxes = anchors_for(model_config)
    config = losses.LossConfig(**loss_cfg.to_dict())

    def loss_fn(cls_outputs, box_outputs, batch, params):
        tgt = targets.assign_targets(batch["boxes"], batch["classes"], anchor_boxes, num_classes)
        return losses.detection_loss(
            cls_outputs, box_outputs, tgt, anchor_boxes, config, params=params
        )

    return loss_fn
