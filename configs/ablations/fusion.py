"""BiFPN feature-fusion ablation: ``--config=configs/ablations/fusion.py:METHOD``.

METHOD is one of ``sum``, ``attn``, ``fastattn``, ``channel_attn``, ``channel_fastattn`` (automl's
``fpn_weight_method``; the model table's value list is the source of truth and validation checks
it). The rest is ``configs/d0.py``. ``sweep()`` lists one override per method for sweep tools.
"""

import ml_collections

from configs import d0

METHODS = ("sum", "attn", "fastattn", "channel_attn", "channel_fastattn")


def get_config(method: str = "fastattn") -> ml_collections.ConfigDict:
    """d0 with ``model.fpn_weight_method = method``."""
    config = d0.get_config()
    config.model.fpn_weight_method = method
    return config


def sweep(add):
    """Calls ``add(**{"config.model.fpn_weight_method": m})`` for every fusion method."""
    for method in METHODS:
        add(**{"config.model.fpn_weight_method": method})
