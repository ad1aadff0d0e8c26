"""Builds the EfficientDet module and its anchors from the trainer's ``config.model``."""

from typing import Any

import ml_collections


def model_overrides(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword overrides for ``get_efficientdet_config``: the set fields of ``config.model``.

    ``name`` and ``num_classes`` are passed separately; unset placeholders (``None``) mean "use the
    model table's value" and are left out.
    """
    overrides = {
        key: model_cfg[key]
        for key in (
            "image_size", "fpn_weight_method", "backbone_drop_connect_rate", "drop_connect_variant"
        )
        if model_cfg[key] is not None
    }
    overrides["dtype"] = model_cfg.dtype
    overrides["remat"] = bool(model_cfg.remat)
    overrides.update(model_cfg.overrides.to_dict())
    return overrides


def input_normalization(
    model_cfg: ml_collections.ConfigDict,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean_rgb, stddev_rgb)`` of ``config.model``: the model table's normalisation for its
    name (ImageNet for D0-D7x, 127 / 128 for lite), or ``config.model.overrides`` where set."""
    from effdet_jax.models.model_config import get_efficientdet_config

    overrides = model_overrides(model_cfg)
    return get_efficientdet_config(model_cfg.name, **overrides).normalization


def build_model(model_cfg: ml_collections.ConfigDict):
    """The flax module for ``config.model`` (``model.config`` is its frozen model config)."""
    import effdet_jax

    return effdet_jax.efficientdet(
        model_cfg.name, num_classes=model_cfg.num_classes, **model_overrides(model_cfg)
    )
