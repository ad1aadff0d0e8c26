"""Drop-connect (stochastic depth) ablation: ``--config=configs/ablations/drop_connect.py:VARIANT``.

VARIANT is one of ``none``, ``sample`` (per example, the official), ``channel``, ``element``,
``weight`` (DropConnect on the projection kernel); see ``EfficientNetConfig.drop_connect_variant``.
The rest is ``configs/d1.py``: automl turns drop-connect off for b0 backbones (so D0 would ablate
nothing), while D1's b1 backbone trains with rate 0.2. ``sweep()`` lists the variants.
"""

import ml_collections

from configs import d1

VARIANTS = ("none", "sample", "channel", "element", "weight")


def get_config(variant: str = "sample") -> ml_collections.ConfigDict:
    """d1 with ``model.drop_connect_variant = variant``."""
    config = d1.get_config()
    config.model.drop_connect_variant = variant
    return config


def sweep(add):
    """Calls ``add(**{"config.model.drop_connect_variant": v})`` for every variant."""
    for variant in VARIANTS:
        add(**{"config.model.drop_connect_variant": variant})
