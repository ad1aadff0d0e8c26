"""Max pooling with TF ``SAME`` padding on ``[batch, height, width, channels]``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.ops.padding import tf_same_padding


def max_pool_same(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """Max pooling with TF SAME padding (padding never wins the max); ``x`` ``[N, H, W, C]``,
    returns ``[N, ceil(H/stride), ceil(W/stride), C]``.

    The gradient goes to the first maximum of each window in row-major order, as XLA's
    ``select_and_scatter`` (what ``jax.grad`` of ``lax.reduce_window`` gives) does, but it is
    computed tap by tap from strided slices (``_max_pool_bwd``): XLA:CPU lowers
    ``select_and_scatter`` to a variadic reduce-window that carries four index arrays, several
    times slower on the BiFPN's pools (benchmarks/RESULTS.md).
    """
    return _max_pool(x, window, stride)


def _max_pool_pads(x_shape, window, stride):
    return tf_same_padding(x_shape[1], window, stride), tf_same_padding(x_shape[2], window, stride)


def _max_pool_forward(x, window, stride):
    pad_h, pad_w = _max_pool_pads(x.shape, window, stride)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
        ((0, 0), pad_h, pad_w, (0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, window, stride):
    return _max_pool_forward(x, window, stride)


def _max_pool_fwd(x, window, stride):
    y = _max_pool_forward(x, window, stride)
    return y, (x, y)


def _max_pool_bwd(window, stride, residuals, dy):
    x, y = residuals
    n, h, w, c = x.shape
    out_h, out_w = y.shape[1], y.shape[2]
    pad_h, pad_w = _max_pool_pads(x.shape, window, stride)
    xp = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)), constant_values=-jnp.inf)
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    taps = [
        lax.slice(xp, (0, a, b, 0), (n, a + span_h, b + span_w, c), (1, stride, stride, 1))
        for a in range(window) for b in range(window)
    ]
    # The first tap (row-major) that holds the window's max, as int8, materialised once: fused
    # into the scatter below, XLA would recompute the tap comparisons for every tap.
    index_dtype = jnp.int8 if len(taps) <= 127 else jnp.int32
    first = jnp.full(y.shape, len(taps), index_dtype)
    for k in reversed(range(len(taps))):
        first = jnp.where(taps[k] == y, jnp.asarray(k, index_dtype), first)
    first = lax.optimization_barrier(first)
    zero = jnp.zeros((), dy.dtype)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for k in range(len(taps)):
        a, b = divmod(k, window)
        # Back to the tap's input positions: stride - 1 zeros between neighbouring outputs.
        dxp = dxp + lax.pad(
            jnp.where(first == k, dy, zero), zero,
            ((0, 0, 0), (a, xp.shape[1] - a - span_h, stride - 1),
             (b, xp.shape[2] - b - span_w, stride - 1), (0, 0, 0)),
        )
    return (dxp[:, pad_h[0]:pad_h[0] + h, pad_w[0]:pad_w[0] + w, :].astype(x.dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
