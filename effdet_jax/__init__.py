"""effdet_jax: EfficientNet and EfficientDet in JAX/Flax."""

from effdet_jax.models.efficientdet import EfficientDet, efficientdet
from effdet_jax.models.efficientnet import EfficientNet, efficientnet
from effdet_jax.models.model_config import EfficientDetConfig, get_efficientdet_config

__all__ = [
    "EfficientDet",
    "EfficientDetConfig",
    "EfficientNet",
    "efficientdet",
    "efficientnet",
    "get_efficientdet_config",
]
