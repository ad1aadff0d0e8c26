"""The exported forward: uint8 pixels in, normalisation and the network (and optionally
post-processing) inside, with the plain XLA graph (``cpu_kernels="off"``).

Input: ``images`` uint8 ``[batch, height, width, 3]`` RGB at the model's ``image_size``, or at
another fixed size that the graph letterboxes (``letterbox``, the eval pipeline's rule).
Outputs (a tuple, named by :func:`output_names`):

* raw: ``cls_L`` ``[batch, H_L, W_L, num_anchors * num_classes]`` logits and ``box_L``
  ``[batch, H_L, W_L, num_anchors * 4]`` box deltas for each level ``L`` (min..max level);
* with NMS: ``boxes`` ``[batch, D, 4]`` float32 ``[ymin, xmin, ymax, xmax]`` in input pixels,
  ``scores`` ``[batch, D]``, ``classes`` ``[batch, D]`` int32 0-based (-1 on padding rows) and
  ``valid`` ``[batch]`` int32, ``D = max_detections``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.export import letterbox as letterbox_lib
from effdet_jax.models.efficientdet import EfficientDet

NMS_OUTPUTS = ("boxes", "scores", "classes", "valid")


def plain_model(model: EfficientDet) -> EfficientDet:
    """``model`` with XLA's own ops on every platform (no FFI kernels, no ``platform_dependent``
    branches), float32, without remat and with its layer stacks unrolled (no loop a converter
    must take): the graph an exported file holds."""
    config = dataclasses.replace(model.config, cpu_kernels="off", dtype="float32", remat=False,
                                 layer_loop="unrolled")
    return EfficientDet(config)


def output_names(model: EfficientDet, with_nms: bool) -> tuple[str, ...]:
    """Names of the serving function's outputs, in order."""
    if with_nms:
        return NMS_OUTPUTS
    levels = range(model.config.min_level, model.config.max_level + 1)
    return tuple(f"cls_{lvl}" for lvl in levels) + tuple(f"box_{lvl}" for lvl in levels)


def image_size(model: EfficientDet) -> tuple[int, int]:
    """``(height, width)`` of the input the model takes."""
    size = model.config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def make_serving_fn(
    model: EfficientDet,
    variables: dict[str, Any],
    postprocess_config: PostprocessConfig | None,
    input_hw: tuple[int, int] | None = None,
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """``serve(images) -> outputs`` (see the module docstring) with ``variables`` baked in.

    ``postprocess_config`` ``None`` gives the raw per-level outputs. ``input_hw``: the input's
    ``(height, width)`` when it differs from the model's size: the graph letterboxes it as the
    eval pipeline does (``letterbox``) and returns boxes in the input's pixels, clipped to it.
    """
    plain = plain_model(model)
    cfg = plain.config
    mean_rgb, stddev_rgb = cfg.normalization
    mean = jnp.asarray(mean_rgb, jnp.float32)
    stddev = jnp.asarray(stddev_rgb, jnp.float32)
    anchor_boxes = jnp.asarray(anchors_lib.generate_anchors(cfg.anchor_config()), jnp.float32)
    size = image_size(plain)
    geo = None
    if input_hw is not None and tuple(input_hw) != size:
        if size[0] != size[1]:
            raise ValueError(f"letterboxing needs a square model input, not {size}")
        geo = letterbox_lib.geometry(tuple(input_hw), size[0])
    in_hw = size if geo is None else geo.input_hw
    variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}

    def serve(images: jax.Array) -> tuple[jax.Array, ...]:
        if images.dtype != jnp.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (*in_hw, 3):
            raise ValueError(
                f"the exported model takes uint8 [batch, {in_hw[0]}, {in_hw[1]}, 3] images, got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        x = (images.astype(jnp.float32) - mean) / stddev
        if geo is not None:
            x = letterbox_lib.letterbox(x, geo)
        cls_out, box_out = plain.apply(variables, x, train=False)
        if postprocess_config is None:
            return tuple(cls_out) + tuple(box_out)
        scale = None if geo is None else jnp.full((images.shape[0],), geo.image_scale, jnp.float32)
        det = postprocess(cls_out, box_out, anchor_boxes, size, scale, postprocess_config)
        if geo is not None:  # boxes in the input's pixels, inside it
            limit = jnp.asarray([in_hw[0], in_hw[1], in_hw[0], in_hw[1]], jnp.float32)
            det["boxes"] = jnp.clip(det["boxes"], 0.0, limit)
        return tuple(det[k] for k in NMS_OUTPUTS)

    return serve
