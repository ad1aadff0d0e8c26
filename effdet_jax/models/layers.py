"""Flax building blocks shared by EfficientNet and EfficientDet: convolutions, batch norm and
activations with automl's initialisers and constants.

Everything is NHWC: activations are ``[batch, height, width, channels]`` and kernels are HWIO
(``[kh, kw, in, out]``; depthwise kernels ``[kh, kw, 1, channels]``). The array-level operations
(TF ``SAME`` padding, depthwise / dense / pointwise convolutions, pooling, resizing) and their
backward passes are in :mod:`effdet_jax.ops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effdet_jax.models.batch_norm import BatchNorm
from effdet_jax.ops.conv import conv2d
from effdet_jax.ops.depthwise import depthwise_conv

Dtype = Any

# Official EfficientNet initialisers: conv kernels N(0, 2/fan_out) with fan_out = kh*kw*out (for a
# depthwise kernel `out` is the depth multiplier, 1); dense kernels U(+-1/sqrt(units)).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_kernel_init = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal", in_axis=-1, out_axis=-2
)
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


# Activations by config name: swish (x*sigmoid(x), the automl default; silu is its other name),
# relu6 (lite), relu, gelu. The model configs validate ``activation`` against these keys.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "silu": nn.swish,
    "relu6": nn.relu6,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation called ``name`` in ``ACTIVATIONS``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def batch_norm(
    train: bool,
    name: str,
    dtype: Dtype = jnp.float32,
    axis_name: str | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
) -> BatchNorm:
    """automl's BN: momentum 0.99, epsilon 1e-3, then ``activation`` (swish is fused into the op,
    see ``ops/batch_norm.py``). Statistics are float32 whatever the compute dtype.

    Under a sharded ``jax.jit`` the batch mean is already over the global batch; ``axis_name`` is only
    for ``shard_map``/``pmap`` code.
    """
    return BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        activation=activation,
        name=name,
    )


def drop_weights(
    kernel: jax.Array, rate: float, rng: jax.Array, keep_prob: jax.Array | None = None
) -> jax.Array:
    """DropConnect on weights (Wan et al. 2013): zero each kernel entry with probability ``rate`` and
    rescale the rest by 1/(1-rate), so the expected output is unchanged. ``keep_prob``: a traced
    ``1 - rate`` (float32 scalar) used instead of ``rate``."""
    keep_prob = 1.0 - rate if keep_prob is None else keep_prob
    keep = jax.random.bernoulli(rng, keep_prob, kernel.shape)
    return jnp.where(keep, kernel / keep_prob, jnp.zeros_like(kernel))


class Conv2D(nn.Module):
    """Convolution with TF SAME padding and the official initialiser.

    Attributes:
      features: output channels.
      kernel_size: square kernel size.
      strides: spatial stride.
      use_bias: add a bias (zeros init).
      weight_drop_rate: DropConnect-on-weights rate used when ``apply_weight_drop`` is called with
        ``train=True`` (needs the ``dropout`` rng); 0 disables it.
    """

    features: int
    kernel_size: int = 1
    strides: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init
    weight_drop_rate: float = 0.0

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, keep_prob: jax.Array | None = None
    ) -> jax.Array:
        """``keep_prob``: a traced ``1 - weight_drop_rate`` (scan input) used instead of the rate's
        value; ``weight_drop_rate > 0`` still decides whether weights are dropped."""
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32
        )
        if train and self.weight_drop_rate > 0.0:
            kernel = drop_weights(
                kernel, self.weight_drop_rate, self.make_rng("dropout"), keep_prob
            )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv2d(x, kernel, self.strides)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class DepthwiseConv2D(nn.Module):
    """Depthwise convolution (depth multiplier 1) with TF SAME padding; kernel ``[k, k, 1, C]``."""

    kernel_size: int = 3
    strides: int = 1
    dtype: Dtype = jnp.float32
    kernel_init: Callable = depthwise_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)


class SeparableConv2D(nn.Module):
    """Depthwise k x k then pointwise 1x1 (with bias), as ``tf.keras.layers.SeparableConv2D``.

    Parameters: ``depthwise/kernel`` ``[k,k,1,C]``, ``pointwise/kernel`` ``[1,1,C,features]`` and
    ``pointwise/bias``.
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    depthwise_kernel_init: Callable = depthwise_kernel_init
    pointwise_kernel_init: Callable = conv_kernel_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DepthwiseConv2D(
            self.kernel_size, 1, self.dtype, self.depthwise_kernel_init,
            name="depthwise",
        )(x)
        pointwise = Conv2D(
            self.features, 1, 1, use_bias=False, dtype=self.dtype,
            kernel_init=self.pointwise_kernel_init, name="pointwise",
        )
        y = pointwise(x)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
