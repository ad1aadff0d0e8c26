"""The jitted detection function used by evaluation and prediction.

Forward pass in inference mode, then automl's post-processing on device (candidates, decode,
NMS), so only ``max_detections`` boxes per image ever reach the host.
"""

from collections.abc import Callable

import jax
import ml_collections

from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.train import objective


def make_detect_fn(
    model, model_config, postprocess_cfg: ml_collections.ConfigDict
) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
    """``detect(variables, images) -> detections`` (pure; jit it).

    ``variables``: {"params", "batch_stats"}; ``images``: [B, S, S, 3] float32 normalised like
    training. Returns ``boxes`` [B, D, 4] yxyx in *network-input* pixels (multiply by a batch's
    ``image_scale`` for original pixels), ``scores`` [B, D], ``classes`` [B, D] int32 0-based
    (-1 on padding rows) and ``valid`` [B] int32, D = ``max_detections``.
    """
    anchor_boxes = objective.anchors_for(model_config)
    config = PostprocessConfig(**postprocess_cfg.to_dict())

    def detect(variables, images):
        cls_out, box_out = model.apply(variables, images, train=False)
        return postprocess(
            cls_out, box_out, anchor_boxes, model_config.image_size, None, config
        )

    return detect
