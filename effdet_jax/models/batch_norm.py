"""Batch normalisation with the activation after it (the flax module).

``BatchNorm`` has flax ``nn.BatchNorm``'s variables (``params``: ``scale``, ``bias``;
``batch_stats``: ``mean``, ``var``), its fast-variance statistics (``E[x^2] - E[x]^2``, clipped at
0, in float32) and its running-average update, so checkpoints and numbers carry over. What it
adds is the activation (swish fused into the op; any other callable applied after). The array
math, its hand-written backward pass and the CPU kernels are in :mod:`effdet_jax.ops.batch_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.ops.batch_norm import eval_batch_norm, train_batch_norm

Dtype = Any


class BatchNorm(nn.Module):
    """Batch norm over all axes but the last, with an optional activation after it.

    Attributes:
      use_running_average: normalise with the running statistics (eval) instead of the batch's.
      momentum, epsilon: as flax / automl (the models pass 0.99 and 1e-3).
      dtype: dtype of the output.
      axis_name: ``shard_map`` / ``pmap`` axis to average the batch statistics over; with it the
        train-mode path is plain autodiff (the fused backward pass has no cross-device sums). Under
        a sharded ``jax.jit`` leave it ``None``: the statistics are global already.
      activation: ``jax.nn.swish`` (fused into the op), ``None``, or any other callable (applied
        to the normalised output).

    Train mode is :func:`effdet_jax.ops.batch_norm.train_batch_norm` (the fused op on CPU, the
    plain math differentiated by JAX elsewhere); with ``axis_name`` it is the plain math with the
    statistics averaged over the axis.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    activation: Callable[[jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
        swish = self.activation is jax.nn.swish
        after = None if swish else self.activation
        if self.use_running_average:
            a = scale * lax.rsqrt(ra_var.value + self.epsilon)
            y = eval_batch_norm(x.astype(jnp.float32), a, ra_mean.value, bias, swish)
        elif self.axis_name is None:
            y, mean, var = train_batch_norm(x, scale, bias, self.epsilon, swish)
        else:
            y, mean, var = self._cross_device(x, scale, bias, swish)
        if not self.use_running_average and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = y.astype(self.dtype)
        return after(y) if after is not None else y

    def _cross_device(self, x, scale, bias, swish):
        """Train mode differentiated by JAX, with the statistics averaged over ``axis_name``
        (flax's pmean of the mean and of the mean square; not while initialising, where the axis
        need not exist)."""
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean, mean_sq = jnp.mean(xf, axes), jnp.mean(xf * xf, axes)
        if not self.is_initializing():
            mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
        var = jnp.maximum(mean_sq - mean * mean, 0.0)
        z = (xf - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return (jax.nn.swish(z) if swish else z), mean, var
