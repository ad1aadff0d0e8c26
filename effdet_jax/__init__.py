"""effdet_jax: EfficientNet and EfficientDet in JAX/Flax.

The model names below are imported on first use, so that ``main.py`` can import the stdlib-only
``effdet_jax.cpu_malloc`` and re-execute itself before JAX and the models are loaded (~1.3 s).
"""

import importlib
from typing import Any

_EXPORTS = {
    "EfficientDet": "effdet_jax.models.efficientdet",
    "efficientdet": "effdet_jax.models.efficientdet",
    "EfficientNet": "effdet_jax.models.efficientnet",
    "efficientnet": "effdet_jax.models.efficientnet",
    "EfficientDetConfig": "effdet_jax.models.model_config",
    "get_efficientdet_config": "effdet_jax.models.model_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'effdet_jax' has no attribute {name!r}")
