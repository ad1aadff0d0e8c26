"""Batch-norm statistics on XLA:CPU through the XLA FFI (``batch_norm_cpu.cc``).

``(sum x, sum x^2)`` over ``[N, H, W, C]`` float32 in one pass (XLA:CPU makes it two), which
:mod:`effdet_jax.models.batch_norm` uses on CPU. The sums come back per image (``[N, 2, C]``) and
are summed over the batch in XLA, so under a sharded ``jax.jit`` each device reduces its own
shard and the batch sum becomes the usual all-reduce: the statistics stay the global batch's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from effdet_jax.kernels.cpu_library import available, partitioned, unavailable_reason


def usable(x: jax.Array) -> bool:
    """Whether :func:`channel_sums` takes ``x``: float32 ``[N, H, W, C]`` on the CPU backend,
    with the kernels built."""
    return jax.default_backend() == "cpu" and x.ndim == 4 and x.dtype == jnp.float32 and available()


def _check(x: jax.Array) -> None:
    if x.ndim != 4 or x.dtype != jnp.float32:
        raise ValueError(f"the CPU batch-norm sums take float32 [N, H, W, C], not {x.dtype}{list(x.shape)}")
    if jax.default_backend() != "cpu":
        raise ValueError(f"the CPU batch-norm sums run on CPU only, not {jax.default_backend()}")
    reason = unavailable_reason()  # builds and registers the kernels on first use
    if reason:
        raise RuntimeError(f"the CPU batch-norm sums are unavailable: {reason}")


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
