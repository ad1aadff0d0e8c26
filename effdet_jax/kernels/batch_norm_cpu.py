"""Train-mode batch norm (+ swish) on XLA:CPU through the XLA FFI (``batch_norm_cpu.cc``).

:mod:`effdet_jax.ops.batch_norm` uses these in the CPU branch of ``lax.platform_dependent``:

* :func:`channel_sums`: ``(sum x, sum x^2)`` over ``[N, H, W, C]`` float32 in one pass (XLA:CPU
  makes it two);
* :func:`swish_apply`: the normalisation and swish, with a vectorised ``exp``;
* :func:`backward_sums` and :func:`backward_input`: the backward pass in two passes (XLA:CPU made
  it five), recomputing the swish derivative from ``x``.

Sums come back per image (``[N, 2, C]``) and are summed over the batch in XLA, so under a sharded
``jax.jit`` each device reduces its own shard and the batch sum becomes the usual all-reduce: the
statistics and gradients stay the global batch's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.kernels.cpu_library import partitioned, unavailable_reason


def _check(x: jax.Array) -> None:
    if x.ndim != 4 or x.dtype != jnp.float32:
        raise ValueError(
            f"the CPU batch-norm kernels take float32 [N, H, W, C], not {x.dtype}{list(x.shape)}"
        )
    reason = unavailable_reason()  # builds and registers the kernels on first use
    if reason:
        raise RuntimeError(f"the CPU batch-norm kernels are unavailable: {reason}")


@functools.cache
def _channel_sums_op():
    def body(x):
        per_image = jax.ShapeDtypeStruct((x.shape[0], 2, x.shape[3]), jnp.float32)
        return jax.ffi.ffi_call("effdet_channel_sums", per_image)(x)

    return partitioned(body, ("image",), "sums", "n h w c -> n k c")


def channel_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum x, sum x^2)`` over the batch and spatial axes of float32 ``x [N, H, W, C]``, each
    ``[C]``."""
    _check(x)
    sums = jnp.sum(_channel_sums_op()(x), axis=0)
    return sums[0], sums[1]


@functools.cache
def _backward_op(target: str, swish: bool):
    def body(x, gy, coefs):
        shape = (x.shape[0], 2, x.shape[3]) if target == "effdet_bn_backward_sums" else x.shape
        out = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.ffi.ffi_call(target, out)(x, gy, coefs, swish=np.int64(swish))

    if target == "effdet_bn_backward_sums":
        return partitioned(body, ("image", "image", "channels"), "sums", "n h w c, n h w c, k c -> n s c")
    return partitioned(body, ("image", "image", "channels"), "image", "n h w c, n h w c, k c -> n h w c")


def backward_sums(
    x: jax.Array, gy: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array, swish: bool
) -> tuple[jax.Array, jax.Array]:
    """``(sum gz, sum gz (x - mean))`` over all axes but the last, each ``[C]``, where
    ``gz = gy * swish'((x - mean) a + bias)`` (or ``gy`` without swish); ``x``, ``gy`` float32
    ``[N, H, W, C]``, the rest ``[C]``."""
    _check(x)
    _check(gy)
    coefs = jnp.stack([a, mean, bias]).astype(jnp.float32)
    sums = jnp.sum(_backward_op("effdet_bn_backward_sums", swish)(x, gy, coefs), axis=0)
    return sums[0], sums[1]


def backward_input(
    x: jax.Array, gy: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array, c1: jax.Array, c0: jax.Array,
    swish: bool,
) -> jax.Array:
    """``a gz + c1 (x - mean) + c0`` with ``gz`` as in :func:`backward_sums`: the input gradient
    of batch norm (+ swish), ``[N, H, W, C]`` float32."""
    _check(x)
    _check(gy)
    coefs = jnp.stack([a, mean, bias, c1, c0]).astype(jnp.float32)
    return _backward_op("effdet_bn_backward_input", swish)(x, gy, coefs)


@functools.cache
def _swish_op():
    def body(x, coefs):
        return jax.ffi.ffi_call("effdet_bn_swish", jax.ShapeDtypeStruct(x.shape, jnp.float32))(x, coefs)

    return partitioned(body, ("image", "channels"), "image", "n h w c, k c -> n h w c")


def swish_apply(x: jax.Array, a: jax.Array, mean: jax.Array, bias: jax.Array) -> jax.Array:
    """``swish((x - mean) a + bias)`` of float32 ``x [N, H, W, C]``; ``a``, ``mean``, ``bias``
    ``[C]``."""
    _check(x)
    return _swish_op()(x, jnp.stack([a, mean, bias]).astype(jnp.float32))
