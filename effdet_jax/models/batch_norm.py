"""Batch normalisation with the activation after it, as one op with a hand-written backward pass.

``BatchNorm`` has flax ``nn.BatchNorm``'s variables (``params``: ``scale``, ``bias``;
``batch_stats``: ``mean``, ``var``), its fast-variance statistics (``E[x^2] - E[x]^2``, clipped at
0, in float32) and its running-average update, so checkpoints and numbers carry over. What it
adds is the activation (swish fused; any other callable applied after) and, in train mode, the
custom VJP of :func:`batch_norm_act`.

Why: autodiff of flax's BN followed by swish left XLA:CPU with about twice the passes over the
activation that the math needs. The backward pass here recomputes the normalised input and the
swish derivative from the stored input instead of storing them, and needs two passes: one for
the two per-channel sums, one for the input gradient. On CPU the statistics, ``swish(z)`` and both
backward passes are FFI kernels (``kernels/batch_norm_cpu.cc``; XLA made the statistics two passes
and the backward pass five): a ``[4, 256, 256, 96]`` float32 unit takes 40 ms forward and
backward, against 66 ms for flax's BN + swish, and the D0 train step's XLA temporaries are 37 %
smaller than with flax's BN (2977 -> 1874 MiB at D0 512 batch 4; ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.kernels import batch_norm_cpu

Dtype = Any


def _swish_and_slope(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


def _batch_stats(x: jax.Array, epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel ``(mean, var, rsqrt(var + epsilon))`` of float32 ``x [..., C]`` (flax's fast
    variance)."""
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    if batch_norm_cpu.usable(x):
        sum_x, sum_sq = batch_norm_cpu.channel_sums(x)
    else:
        sum_x, sum_sq = jnp.sum(x, axes), jnp.sum(x * x, axes)
    mean = sum_x / n
    var = jnp.maximum(sum_sq / n - mean * mean, 0.0)
    return mean, var, lax.rsqrt(var + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, swish: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm over all axes but the last, then swish (or nothing).

    Args:
      x: ``[..., C]`` (``[batch, height, width, channels]`` in the models), any float dtype; the
        statistics and the arithmetic are float32.
      scale, bias: ``[C]`` float32.
      epsilon: added to the variance.
      swish: apply ``x * sigmoid(x)`` after the affine transform.
    Returns:
      ``(y, mean, var)``: ``y`` float32 of ``x``'s shape, the batch ``mean`` and biased ``var``
      ``[C]`` (for the running averages).
    """
    return _batch_norm_act_fwd(x, scale, bias, epsilon, swish)[0]


def _batch_norm_act_fwd(x, scale, bias, epsilon, swish):
    xf = x.astype(jnp.float32)
    mean, var, rstd = _batch_stats(xf, epsilon)
    if swish and batch_norm_cpu.usable(xf):
        y = batch_norm_cpu.swish_apply(xf, scale * rstd, mean, bias)
    else:
        # Without swish XLA fuses the affine map into the consumer (the residual add).
        z = (xf - mean) * (scale * rstd) + bias
        y = _swish_and_slope(z)[0] if swish else z
    return (y, mean, var), (x, scale, bias, mean, rstd)


def _batch_norm_act_bwd(epsilon, swish, residuals, cotangents):
    # The barrier keeps XLA from sharing the recomputed swish with the forward pass, which would
    # store the sigmoid (a write and a read of the whole activation) instead of recomputing it.
    x, scale, bias, mean, rstd = lax.optimization_barrier(residuals)
    gy, gmean, gvar = cotangents
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    a = scale * rstd
    kernels = batch_norm_cpu.usable(xf, gy)
    if kernels:
        sum_gz, sum_gz_centred = batch_norm_cpu.backward_sums(xf, gy, a, mean, bias, swish)
    else:
        centred = xf - mean
        gz = gy * _swish_and_slope(centred * a + bias)[1] if swish else gy
        sum_gz, sum_gz_centred = jnp.sum(gz, axes), jnp.sum(gz * centred, axes)
    gscale = rstd * sum_gz_centred  # sum(gz * xhat)
    # d/dx of y (through xhat, mean and rstd), of the mean (1/n) and of the variance
    # (2 (x - mean) / n): gx = a gz + c1 (x - mean) + c0.
    c1 = (2.0 * gvar - a * rstd * gscale) / n
    c0 = (gmean - a * sum_gz) / n
    if kernels:
        gx = batch_norm_cpu.backward_input(xf, gy, a, mean, bias, c1, c0, swish)
    else:
        gx = a * gz + c1 * centred + c0
    return gx.astype(x.dtype), gscale, sum_gz


batch_norm_act.defvjp(_batch_norm_act_fwd, _batch_norm_act_bwd)


def _affine_act(x, a, mean, bias, swish: bool):
    z = (x - mean) * a + bias
    return jax.nn.swish(z) if swish else z


@jax.custom_vjp
def affine_swish(x: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array) -> jax.Array:
    """``swish((x - mean) a + bias)`` of float32 ``x [N, H, W, C]`` (eval-mode BN + swish), by the
    CPU kernel (``kernels/batch_norm_cpu.cc``): XLA:CPU's fusion of it was ~30 % of D0 inference
    at batch 1. Differentiable (frozen-BN fine-tuning): the backward pass is autodiff of the same
    expression in XLA."""
    return batch_norm_cpu.swish_apply(x, a, mean, bias)


def _affine_swish_fwd(x, a, mean, bias):
    return batch_norm_cpu.swish_apply(x, a, mean, bias), (x, a, mean, bias)


def _affine_swish_bwd(residuals, gy):
    _, vjp = jax.vjp(lambda *args: _affine_act(*args, swish=True), *residuals)
    return vjp(gy)


affine_swish.defvjp(_affine_swish_fwd, _affine_swish_bwd)


def use_fused_backward() -> bool:
    """Whether train-mode ``BatchNorm`` uses :func:`batch_norm_act` (on CPU) or autodiff."""
    return jax.default_backend() == "cpu"


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

    Train mode uses :func:`batch_norm_act` on the CPU backend, where it was measured; elsewhere
    (GPU / TPU, whose XLA fuses the autodiff form well) and with ``axis_name`` it is the same
    math differentiated by JAX.
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
            xf = x.astype(jnp.float32)
            if swish and batch_norm_cpu.usable(xf):
                y = affine_swish(xf, a, ra_mean.value, bias)
            else:
                y = _affine_act(xf, a, ra_mean.value, bias, swish)
        elif self.axis_name is None and use_fused_backward():
            y, mean, var = batch_norm_act(x, scale, bias, self.epsilon, swish)
        else:
            y, mean, var = self._autodiff(x, scale, bias, swish)
        if not self.use_running_average and not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        y = y.astype(self.dtype)
        return after(y) if after is not None else y

    def _autodiff(self, x, scale, bias, swish):
        """Train mode differentiated by JAX, with the statistics averaged over ``axis_name`` when
        there is one (flax's pmean of the mean and of the mean square; not while initialising,
        where the axis need not exist)."""
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean, mean_sq = jnp.mean(xf, axes), jnp.mean(xf * xf, axes)
        if self.axis_name is not None and not self.is_initializing():
            mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
        var = jnp.maximum(mean_sq - mean * mean, 0.0)
        z = (xf - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return (jax.nn.swish(z) if swish else z), mean, var
