"""effdet (PyTorch, rwightman/efficientdet-pytorch) ``tf_efficientdet_*`` state dicts ->
effdet_jax EfficientDet variables.

A state dict is a mapping of names to numpy arrays: load files without unpickling untrusted code
(``torch.load(path, weights_only=True)``, safetensors or npz), then convert.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effdet_jax.convert.common import fill_variables, torch_bn_assignments, torch_conv_to_hwio
from effdet_jax.convert.timm import efficientnet_assignments
from effdet_jax.models.bifpn import bifpn_nodes
from effdet_jax.models.efficientdet import EfficientDet, efficientdet
from effdet_jax.models.layout import model_groups, to_stacked, to_unrolled


def effdet_assignments(model: EfficientDet, sd: Mapping[str, np.ndarray]) -> dict:
    """Target path (unrolled layout, ``effdet_jax.models.layout``) -> (effdet name, array or
    None) for every variable ``model`` may have."""
    cfg = model.config
    a = efficientnet_assignments(
        cfg.backbone_config(), sd, prefix="backbone.",
        target_prefix=("backbone",), features_only=True,
    )

    def conv(path, name):
        return {("params", *path, "kernel"): (name, torch_conv_to_hwio(sd[name]) if name in sd else None)}

    def bias(path, name):
        return {("params", *path, "bias"): (name, sd.get(name))}

    def sep(path, prefix):
        return (conv((*path, "depthwise"), f"{prefix}.conv_dw.weight")
                | conv((*path, "pointwise"), f"{prefix}.conv_pw.weight")
                | bias(path, f"{prefix}.conv_pw.bias"))

    def resample(path, prefix):
        return (conv((*path, "conv"), f"{prefix}.conv.conv.weight")
                | bias((*path, "conv"), f"{prefix}.conv.conv.bias")
                | torch_bn_assignments((*path, "bn"), sd, f"{prefix}.conv.bn"))

    for lvl in range(6, cfg.max_level + 1):
        a |= resample((f"resample_p{lvl}",), f"fpn.resample.{lvl - cfg.min_level}")
    for c in range(cfg.fpn_cell_repeats):
        for k, (_, inputs) in enumerate(bifpn_nodes(cfg.min_level, cfg.max_level)):
            node = f"fpn.cell.{c}.fnode.{k}"
            cell = (f"fpn_cell_{c}",)
            for i, src in enumerate(inputs):
                a |= resample((*cell, f"node_{k}_resample_{i}_{src}"), f"{node}.combine.resample.{src}")
            w = f"{node}.combine.edge_weights"
            a[("params", *cell, f"node_{k}_fusion")] = (w, sd.get(w))
            if cfg.separable_conv:
                a |= sep((*cell, f"node_{k}_conv"), f"{node}.after_combine.conv")
            else:
                a |= conv((*cell, f"node_{k}_conv"), f"{node}.after_combine.conv.conv.weight")
                a |= bias((*cell, f"node_{k}_conv"), f"{node}.after_combine.conv.conv.bias")
            a |= torch_bn_assignments((*cell, f"node_{k}_bn"), sd, f"{node}.after_combine.conv.bn")
    for net in ("class_net", "box_net"):
        for r in range(cfg.box_class_repeats):
            a |= sep((net, f"conv_{r}"), f"{net}.conv_rep.{r}")
            for lvl in range(cfg.min_level, cfg.max_level + 1):
                a |= torch_bn_assignments(
                    (net, f"bn_{r}_p{lvl}"), sd, f"{net}.bn_rep.{r}.{lvl - cfg.min_level}.bn"
                )
        a |= sep((net, "predict"), f"{net}.predict")
    return a


def load_effdet_state_dict(
    state_dict: Mapping[str, np.ndarray], name: str, num_classes: int = 90, **overrides
) -> dict:
    """Convert an effdet ``tf_efficientdet_*`` state dict.

    Args:
      state_dict: effdet names -> numpy arrays (``num_batches_tracked`` entries are ignored).
      name: our model name (``efficientdet-d0``; ``tf_efficientdet_d0`` is accepted too).
      num_classes / overrides: as for ``effdet_jax.efficientdet``.
    Returns:
      ``{"params": ..., "batch_stats": ...}``.
    """
    name = name.replace("tf_efficientdet_", "efficientdet-")
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    model = efficientdet(name, num_classes=num_classes, **overrides)
    groups = model_groups(model.config)
    shapes = to_unrolled(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.config.image_size, 3)))
    ), groups)
    present = set(traverse_util.flatten_dict(dict(shapes)))
    assignments = {p: v for p, v in effdet_assignments(model, sd).items() if p in present}
    ignored = {k for k in sd if k.endswith("num_batches_tracked")}
    return to_stacked(fill_variables(shapes, assignments, sd.keys(), ignored), groups)
