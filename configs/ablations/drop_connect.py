"""Drop-connect (stochastic depth) ablation: ``--config=configs/ablations/drop_connect.py:VARIANT``.

VARIANT is one of ``effdet_jax.models.efficientnet_config.DROP_CONNECT_VARIANTS`` (see
``EfficientNetConfig.drop_connect_variant``). The rest is ``configs/d1.py``: automl
turns drop-connect off for b0 backbones (so D0 would ablate nothing), while D1's b1 backbone trains
with rate 0.2. ``sweep(rates)`` is every variant at every backbone drop-connect rate (``none``
once), compared with ``BASELINE`` (no drop-connect); ``experiments/ablate.py --sweep=drop_connect
--rates ...`` runs it on any base config.
"""

from collections.abc import Sequence
from typing import Any

import ml_collections

from configs import d1
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS

BASELINE = "none"


def get_config(variant: str = "sample") -> ml_collections.ConfigDict:
    """d1 with ``model.drop_connect_variant = variant``."""
    config = d1.get_config()
    config.model.drop_connect_variant = variant
    return config


def sweep(rates: Sequence[float] = (0.2,)) -> dict[str, dict[str, Any]]:
    """``{"none": ...}`` (rate 0) and ``{"VARIANT@RATE": ...}`` for every other variant and rate;
    each value sets ``model.drop_connect_variant`` and ``model.backbone_drop_connect_rate``."""
    arms = {"none": {"model.drop_connect_variant": "none", "model.backbone_drop_connect_rate": 0.0}}
    for variant in DROP_CONNECT_VARIANTS:
        if variant == "none":
            continue
        for rate in rates:
            arms[f"{variant}@{rate:g}"] = {
                "model.drop_connect_variant": variant,
                "model.backbone_drop_connect_rate": float(rate),
            }
    return arms
