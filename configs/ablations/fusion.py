"""BiFPN feature-fusion ablation: ``--config=configs/ablations/fusion.py:METHOD``.

METHOD is one of ``effdet_jax.models.bifpn.FUSION_METHODS`` (automl's ``fpn_weight_method``; see
``bifpn.fuse``). The rest is ``configs/d0.py``. ``sweep()`` is one arm per method, compared
with ``BASELINE`` (softmax fusion: the paper's claim is that fast normalised fusion learns like it);
``experiments/ablate.py --sweep=fusion`` runs it on any base config.
"""

from typing import Any

import ml_collections

from configs import d0
from effdet_jax.models.bifpn import FUSION_METHODS

BASELINE = "attn"


def get_config(method: str = "fastattn") -> ml_collections.ConfigDict:
    """d0 with ``model.fpn_weight_method = method``."""
    config = d0.get_config()
    config.model.fpn_weight_method = method
    return config


def sweep() -> dict[str, dict[str, Any]]:
    """``{method: {"model.fpn_weight_method": method}}`` for every fusion method."""
    return {method: {"model.fpn_weight_method": method} for method in FUSION_METHODS}
