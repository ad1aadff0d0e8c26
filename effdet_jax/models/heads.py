"""Class and box prediction heads: conv weights shared across pyramid levels, BN per level.

Input: dict level -> ``[batch, h_l, w_l, fpn_filters]``. Output: a list over levels min..max of
``[batch, h_l, w_l, num_anchors * num_outputs]`` raw values (class logits or box deltas ty, tx, th,
tw), anchor-major then output, as automl lays them out.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effdet_jax.models.efficientnet import drop_connect
from effdet_jax.models.layers import SeparableConv2D, activation_fn, batch_norm

Dtype = Any
# automl's heads use Keras' variance_scaling() default: scale 1, fan_in, truncated normal.
head_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
head_depthwise_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2
)
CLASS_PRIOR = 0.01


class PredictionHead(nn.Module):
    """``repeats`` x (separable conv [shared] -> BN [per level] -> activation), then a separable
    predict conv [shared].

    With ``drop_connect_rate`` set (not None), repeats after the first add automl's residual and drop
    the branch with that rate during training (``rng`` collection ``dropout``).
    """

    num_outputs: int
    num_anchors: int
    features: int
    repeats: int
    min_level: int
    max_level: int
    activation: str = "swish"
    bias_prior: float | None = None
    drop_connect_rate: float | None = None
    drop_connect_variant: str = "sample"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array], train: bool = False) -> list[jax.Array]:
        act = activation_fn(self.activation)
        sep = lambda features, name, **kw: SeparableConv2D(  # noqa: E731
            features, 3, dtype=self.dtype,
            depthwise_kernel_init=head_depthwise_init, pointwise_kernel_init=head_init,
            name=name, **kw,
        )
        convs = [sep(self.features, f"conv_{r}") for r in range(self.repeats)]
        bias_init = nn.initializers.zeros
        if self.bias_prior is not None:
            bias_init = nn.initializers.constant(-math.log((1 - self.bias_prior) / self.bias_prior))
        predict = sep(self.num_anchors * self.num_outputs, "predict", bias_init=bias_init)
        outputs = []
        for lvl in range(self.min_level, self.max_level + 1):
            x = feats[lvl]
            for r in range(self.repeats):
                residual = x
                x = convs[r](x)
                x = batch_norm(train, f"bn_{r}_p{lvl}", self.dtype, activation=act)(x)
                if r > 0 and self.drop_connect_rate is not None:
                    if train and self.drop_connect_rate > 0:
                        x = drop_connect(
                            x, self.drop_connect_rate, self.drop_connect_variant,
                            self.make_rng("dropout"),
                        )
                    x = x + residual
            outputs.append(predict(x).astype(jnp.float32))
        return outputs
