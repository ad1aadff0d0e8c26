"""timm ``tf_efficientnet_*`` state dicts -> effdet_jax EfficientNet variables.

A state dict here is a mapping of names to numpy arrays: load files without unpickling untrusted code
(``torch.load(path, weights_only=True)``, safetensors or npz), then convert.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.convert.common import fill_variables, torch_bn_assignments, torch_conv_to_hwio
from effdet_jax.models.efficientnet import efficientnet
from effdet_jax.models.efficientnet_config import EfficientNetConfig
from effdet_jax.models.layout import model_groups, to_stacked, to_unrolled


def efficientnet_assignments(
    config: EfficientNetConfig,
    sd: Mapping[str, np.ndarray],
    prefix: str = "",
    target_prefix: tuple[str, ...] = (),
    features_only: bool = False,
) -> dict:
    """Target path (unrolled layout, ``effdet_jax.models.layout``) -> (timm name, array) for an
    EfficientNet; ``prefix`` is the timm module prefix
    (``backbone.`` inside effdet), ``target_prefix`` the flax module path of the network."""

    def conv(target: tuple[str, ...], name: str) -> dict:
        value = torch_conv_to_hwio(sd[name]) if name in sd else None
        return {("params", *target_prefix, *target, "kernel"): (name, value)}

    def bias(target: tuple[str, ...], name: str) -> dict:
        return {("params", *target_prefix, *target, "bias"): (name, sd.get(name))}

    def bn(target: str, name: str) -> dict:
        return torch_bn_assignments((*target_prefix, *target), sd, name)

    a = {}
    a |= conv(("stem_conv",), f"{prefix}conv_stem.weight")
    a |= bn(("stem_bn",), f"{prefix}bn1")
    stage_index: dict[int, int] = {}
    for i, blk in enumerate(config.expanded_blocks()):
        stage = blk["stage"]
        idx = stage_index.get(stage, 0)
        stage_index[stage] = idx + 1
        t = f"{prefix}blocks.{stage}.{idx}."
        b = (f"block_{i}",)
        if blk["expand_ratio"] == 1:  # timm's DepthwiseSeparableConv
            a |= conv((*b, "depthwise_conv"), t + "conv_dw.weight")
            a |= bn((*b, "depthwise_bn"), t + "bn1")
            a |= conv((*b, "project_conv"), t + "conv_pw.weight")
            a |= bn((*b, "project_bn"), t + "bn2")
        else:  # InvertedResidual
            a |= conv((*b, "expand_conv"), t + "conv_pw.weight")
            a |= bn((*b, "expand_bn"), t + "bn1")
            a |= conv((*b, "depthwise_conv"), t + "conv_dw.weight")
            a |= bn((*b, "depthwise_bn"), t + "bn2")
            a |= conv((*b, "project_conv"), t + "conv_pwl.weight")
            a |= bn((*b, "project_bn"), t + "bn3")
        if blk["se_ratio"]:
            for ours, theirs in (("se_reduce", "conv_reduce"), ("se_expand", "conv_expand")):
                a |= conv((*b, "se", ours), f"{t}se.{theirs}.weight")
                a |= bias((*b, "se", ours), f"{t}se.{theirs}.bias")
    if not features_only:
        a |= conv(("head_conv",), f"{prefix}conv_head.weight")
        a |= bn(("head_bn",), f"{prefix}bn2")
        w = f"{prefix}classifier.weight"
        a[("params", *target_prefix, "classifier", "kernel")] = (
            w, np.ascontiguousarray(sd[w].T) if w in sd else None
        )
        a |= bias(("classifier",), f"{prefix}classifier.bias")
    return a


def load_timm_efficientnet(
    state_dict: Mapping[str, np.ndarray], name: str, num_classes: int = 1000
) -> dict:
    """Convert a timm ``tf_efficientnet_b*`` / ``tf_efficientnet_lite*`` state dict.

    Args:
      state_dict: timm names -> numpy arrays (``num_batches_tracked`` entries are ignored).
      name: our model name, e.g. ``efficientnet-b0`` (``tf_efficientnet_b0`` is accepted too).
      num_classes: classifier size.
    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``effdet_jax.efficientnet(name, num_classes)``.
    """
    name = name.replace("tf_efficientnet_", "efficientnet-")
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    model = efficientnet(name, num_classes=num_classes)
    groups = model_groups(model.config)
    shapes = to_unrolled(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    ), groups)
    assignments = efficientnet_assignments(model.config, sd)
    ignored = {k for k in sd if k.endswith("num_batches_tracked")}
    return to_stacked(fill_variables(shapes, assignments, sd.keys(), ignored), groups)
