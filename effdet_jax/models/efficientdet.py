"""EfficientDet (Tan, Pang & Le 2020) in flax.linen: EfficientNet backbone, BiFPN, shared heads.

``model.apply(variables, images, train=False)`` with images ``[batch, height, width, 3]`` (normalised,
``config.image_size``) returns ``(class_outputs, box_outputs)``: lists over levels min..max of
``[batch, h_l, w_l, num_anchors * num_classes]`` raw logits and ``[batch, h_l, w_l, num_anchors * 4]``
raw box deltas (ty, tx, th, tw), anchor-major. Targets, losses and post-processing are plain functions
in ``effdet_jax.detection``.

Parameter tree: ``backbone`` (EfficientNet features), ``resample_p{L}`` for levels the backbone lacks,
``fpn_cell_0`` (the first BiFPN cell, with the resample convs), ``fpn_cells_1_to_{N-1}`` (the other
cells, identical, as one ``nn.scan``: every leaf stacked ``[N - 1, ...]``, ``models/layout.py``),
``class_net`` and ``box_net`` (each: ``repeats_0_to_{R-1}``, the head's repeats as one ``nn.scan``,
and ``predict``; ``models/heads.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from effdet_jax.models.bifpn import BiFPNCell, ResampleFeature, scanned_cells
from effdet_jax.models.efficientnet import EfficientNet
from effdet_jax.models.heads import CLASS_PRIOR, PredictionHead
from effdet_jax.models.layout import stacked_cell_name
from effdet_jax.models.model_config import EfficientDetConfig, get_efficientdet_config
from effdet_jax.ops.policy import cpu_kernels


class EfficientDet(nn.Module):
    """EfficientDet for one ``EfficientDetConfig``; see the module docstring for layouts."""

    config: EfficientDetConfig

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False):
        with cpu_kernels(self.config.cpu_kernels):
            return self._forward(images, train)

    def _forward(self, images: jax.Array, train: bool):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        unrolled = cfg.layer_loop == "unrolled"
        endpoints = EfficientNet(
            cfg.backbone_config(), features_only=True, dtype=dtype, remat=cfg.remat != "none",
            unrolled=unrolled, name="backbone",
        )(images, train)
        sizes = cfg.feature_sizes()
        feats = {lvl: endpoints[2**lvl] for lvl in range(cfg.min_level, min(cfg.max_level, 5) + 1)}
        for lvl in range(6, cfg.max_level + 1):
            feats[lvl] = ResampleFeature(
                cfg.fpn_num_filters, sizes[lvl], dtype, name=f"resample_p{lvl}"
            )(feats[lvl - 1], train)
        for lvl, (h, w) in sizes.items():
            if feats[lvl].shape[1:3] != (h, w):
                raise ValueError(
                    f"P{lvl} is {feats[lvl].shape[1:3]} but anchors expect {(h, w)}: feed images of "
                    f"config.image_size={cfg.image_size}, got {images.shape[1:3]}"
                )

        cell_cls = nn.remat(BiFPNCell, static_argnums=(2,)) if cfg.remat != "none" else BiFPNCell
        cell_kwargs = dict(
            min_level=cfg.min_level,
            max_level=cfg.max_level,
            features=cfg.fpn_num_filters,
            feature_sizes=sizes,
            weight_method=cfg.fpn_weight_method,
            activation=cfg.activation,
            separable_conv=cfg.separable_conv,
            dtype=dtype,
        )
        feats = cell_cls(**cell_kwargs, name="fpn_cell_0")(feats, train)
        if cfg.fpn_cell_repeats > 1:
            feats = scanned_cells(
                cell_kwargs, cfg.fpn_cell_repeats - 1, train, cfg.remat != "none", unrolled,
                stacked_cell_name(1, cfg.fpn_cell_repeats - 1),
            )(feats)

        head = lambda outputs, prior, name: PredictionHead(  # noqa: E731
            num_outputs=outputs,
            num_anchors=cfg.num_anchors,
            features=cfg.fpn_num_filters,
            repeats=cfg.box_class_repeats,
            min_level=cfg.min_level,
            max_level=cfg.max_level,
            activation=cfg.activation,
            bias_prior=prior,
            drop_connect_rate=cfg.head_drop_connect_rate,
            drop_connect_variant=(
                "sample" if cfg.drop_connect_variant in ("none", "weight")
                else cfg.drop_connect_variant
            ),
            dtype=dtype,
            remat=cfg.remat == "blocks+heads",
            unrolled=unrolled,
            name=name,
        )
        class_outputs = head(cfg.num_classes, CLASS_PRIOR, "class_net")(feats, train)
        box_outputs = head(4, None, "box_net")(feats, train)
        return class_outputs, box_outputs


def efficientdet(name: str = "efficientdet-d0", num_classes: int = 90, **overrides) -> EfficientDet:
    """Build ``efficientdet-d0`` .. ``d7``, ``d7x``, ``efficientdet-lite0`` .. ``lite4``, ``lite3x``.

    ``overrides`` set any ``EfficientDetConfig`` field (``image_size=256``,
    ``fpn_weight_method="attn"``, ``dtype="bfloat16"``, ``remat="blocks"``, ...).
    """
    return EfficientDet(get_efficientdet_config(name, num_classes=num_classes, **overrides))
