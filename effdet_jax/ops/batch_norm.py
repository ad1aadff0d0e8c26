"""Batch normalisation with swish after it, as one op with a hand-written backward pass.

``x`` is ``[..., C]`` (``[batch, height, width, channels]`` in the models) in any float dtype;
statistics and arithmetic are float32; per-channel vectors are ``[C]``. The statistics are
flax's fast variance (``E[x^2] - E[x]^2``, clipped at 0).

Why: autodiff of BN followed by swish leaves XLA:CPU with about twice the passes over the
activation that the math needs. :func:`batch_norm_act`'s backward pass recomputes the normalised
input and the swish derivative from the stored input instead of storing them, and needs two
passes: one for the two per-channel sums, one for the input gradient. On CPU the statistics,
``swish(z)`` and both backward passes are FFI kernels (``kernels/batch_norm_cpu.cc``), which
also makes the train step's XLA temporaries smaller (benchmarks/RESULTS.md).

:func:`train_batch_norm` and :func:`eval_batch_norm` choose by the CPU-kernel policy
(``ops.policy``) and, inside the traced function, by platform: the fused op (with the FFI
kernels where they are on and take float32 ``[N, H, W, C]``) on CPU, the plain expression
differentiated by JAX elsewhere (GPU / TPU XLA fuses it well) and everywhere with ``off``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.kernels import batch_norm_cpu
from effdet_jax.ops import policy as policy_lib


def _swish_and_slope(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))


def _takes_kernels(kernels: bool, *arrays: jax.Array) -> bool:
    return kernels and all(a.ndim == 4 and a.dtype == jnp.float32 for a in arrays)


def _batch_stats(x: jax.Array, epsilon: float, kernels: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-channel ``(mean, var, rsqrt(var + epsilon))`` of float32 ``x [..., C]``."""
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    if _takes_kernels(kernels, x):
        sum_x, sum_sq = batch_norm_cpu.channel_sums(x)
    else:
        sum_x, sum_sq = jnp.sum(x, axes), jnp.sum(x * x, axes)
    mean = sum_x / n
    var = jnp.maximum(sum_sq / n - mean * mean, 0.0)
    return mean, var, lax.rsqrt(var + epsilon)


def plain_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, swish: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm (+ swish) as plain JAX for autodiff: ``(y, mean, var)`` as
    :func:`batch_norm_act`."""
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean, mean_sq = jnp.mean(xf, axes), jnp.mean(xf * xf, axes)
    var = jnp.maximum(mean_sq - mean * mean, 0.0)
    z = (xf - mean) * (scale * lax.rsqrt(var + epsilon)) + bias
    return (jax.nn.swish(z) if swish else z), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_act(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, swish: bool, kernels: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm over all axes but the last, then swish (or nothing).

    Args:
      x: ``[..., C]``, any float dtype; the statistics and the arithmetic are float32.
      scale, bias: ``[C]`` float32.
      epsilon: added to the variance.
      swish: apply ``x * sigmoid(x)`` after the affine transform.
      kernels: use the CPU FFI kernels (CPU only) where they take the operands (float32
        ``[N, H, W, C]``); otherwise the same math in XLA.
    Returns:
      ``(y, mean, var)``: ``y`` float32 of ``x``'s shape, the batch ``mean`` and biased ``var``
      ``[C]`` (for the running averages).
    """
    return _batch_norm_act_fwd(x, scale, bias, epsilon, swish, kernels)[0]


def _batch_norm_act_fwd(x, scale, bias, epsilon, swish, kernels):
    xf = x.astype(jnp.float32)
    mean, var, rstd = _batch_stats(xf, epsilon, kernels)
    if swish and _takes_kernels(kernels, xf):
        y = batch_norm_cpu.swish_apply(xf, scale * rstd, mean, bias)
    else:
        # Without swish XLA fuses the affine map into the consumer (the residual add).
        z = (xf - mean) * (scale * rstd) + bias
        y = _swish_and_slope(z)[0] if swish else z
    return (y, mean, var), (x, scale, bias, mean, rstd)


def _batch_norm_act_bwd(epsilon, swish, kernels, residuals, cotangents):
    # The barrier keeps XLA from sharing the recomputed swish with the forward pass, which would
    # store the sigmoid (a write and a read of the whole activation) instead of recomputing it.
    x, scale, bias, mean, rstd = lax.optimization_barrier(residuals)
    gy, gmean, gvar = cotangents
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    a = scale * rstd
    kernels = _takes_kernels(kernels, xf, gy)
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


def train_batch_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, swish: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm (+ swish), ``(y, mean, var)`` as :func:`batch_norm_act`, chosen by
    the CPU-kernel policy and the platform (module docstring)."""
    policy = policy_lib.current()
    if not policy.cpu_paths:
        return plain_batch_norm(x, scale, bias, epsilon, swish)
    return batch_norm_by_platform(x, scale, bias, epsilon, swish, policy.ffi)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_by_platform(x, scale, bias, epsilon: float, swish: bool, kernels: bool):
    """:func:`batch_norm_act` on CPU, :func:`plain_batch_norm` and its autodiff elsewhere; forward
    and backward each selected with ``lax.platform_dependent``, with the same residuals."""
    return _by_platform_fwd(x, scale, bias, epsilon, swish, kernels)[0]


def _by_platform_fwd(x, scale, bias, epsilon, swish, kernels):
    def cpu(x, scale, bias):
        (y, mean, var), (_, _, _, _, rstd) = _batch_norm_act_fwd(x, scale, bias, epsilon, swish, kernels)
        return (y, mean, var), rstd

    def default(x, scale, bias):
        y, mean, var = plain_batch_norm(x, scale, bias, epsilon, swish)
        return (y, mean, var), lax.rsqrt(var + epsilon)

    outputs, rstd = lax.platform_dependent(x, scale, bias, cpu=cpu, default=default)
    return outputs, (x, scale, bias, outputs[1], rstd)


def _by_platform_bwd(epsilon, swish, kernels, residuals, cotangents):
    def cpu(residuals, cotangents):
        return _batch_norm_act_bwd(epsilon, swish, kernels, residuals, cotangents)

    def default(residuals, cotangents):
        x, scale, bias = residuals[:3]
        _, vjp = jax.vjp(lambda *args: plain_batch_norm(*args, epsilon, swish), x, scale, bias)
        return vjp(cotangents)

    return lax.platform_dependent(residuals, cotangents, cpu=cpu, default=default)


batch_norm_by_platform.defvjp(_by_platform_fwd, _by_platform_bwd)


def affine_act(x: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array, swish: bool) -> jax.Array:
    """``(x - mean) a + bias``, then swish if ``swish``: eval-mode BN with ``a = scale /
    sqrt(var + epsilon)``; ``x`` ``[..., C]`` float32, the rest ``[C]``."""
    z = (x - mean) * a + bias
    return jax.nn.swish(z) if swish else z


@jax.custom_vjp
def affine_swish(x: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array) -> jax.Array:
    """``swish((x - mean) a + bias)`` of float32 ``x [N, H, W, C]`` (eval-mode BN + swish): the
    CPU kernel (``kernels/batch_norm_cpu.cc``) on CPU, :func:`affine_act` elsewhere, selected with
    ``lax.platform_dependent``. XLA:CPU's fusion of it is a large part of D0 inference at batch 1.
    Differentiable (frozen-BN fine-tuning): the backward pass is autodiff of :func:`affine_act`."""
    return _affine_swish_fwd(x, a, mean, bias)[0]


def _affine_swish_fwd(x, a, mean, bias):
    y = lax.platform_dependent(
        x, a, mean, bias,
        cpu=batch_norm_cpu.swish_apply,
        default=lambda *args: affine_act(*args, swish=True),
    )
    return y, (x, a, mean, bias)


def _affine_swish_bwd(residuals, gy):
    _, vjp = jax.vjp(lambda *args: affine_act(*args, swish=True), *residuals)
    return vjp(gy)


affine_swish.defvjp(_affine_swish_fwd, _affine_swish_bwd)


def eval_batch_norm(x: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array, swish: bool) -> jax.Array:
    """Eval-mode batch norm (+ swish) of float32 ``x``: :func:`affine_swish` where the policy has
    the FFI kernels on and they take ``x``, else :func:`affine_act`."""
    if swish and _takes_kernels(policy_lib.current().ffi, x):
        return affine_swish(x, a, mean, bias)
    return affine_act(x, a, mean, bias, swish)
