"""effdet_jax: EfficientNet and EfficientDet in JAX/Flax."""

from effdet_jax.models.efficientnet import efficientnet

__all__ = ["efficientnet"]
