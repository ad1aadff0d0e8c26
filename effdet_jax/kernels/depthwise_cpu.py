"""Depthwise convolution on XLA:CPU through the XLA FFI (``depthwise_cpu.cc``).

Built and registered by :mod:`effdet_jax.kernels.cpu_library` on first use; where that fails,
:func:`unavailable_reason` says why and :mod:`effdet_jax.ops.depthwise` uses the XLA
shift-and-add formulation on CPU instead (same values to float32 rounding). These functions
only lower for the CPU platform: :mod:`effdet_jax.ops.depthwise` calls them in the CPU branch of
``lax.platform_dependent``.

All three operations are independent per image and partitioned by
:func:`cpu_library.partitioned`, so that under a sharded ``jax.jit`` each runs on every device's
shard of the batch (and of the channels, if those are sharded) with no gathering; the kernel
gradient is returned per image and summed over the batch in XLA, which the SPMD partitioner
turns into the usual gradient all-reduce. Layouts: ``x`` / ``y`` ``[N, H, W, C]`` float32,
kernel ``[kh, kw, 1, C]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.kernels.cpu_library import available, partitioned, unavailable_reason

__all__ = ["available", "forward", "input_grad", "kernel_grad", "unavailable_reason"]

Pads = tuple[tuple[int, int], tuple[int, int]]
MAX_KERNEL_SIZE = 16  # kMaxTaps in depthwise_cpu.cc


def _attributes(stride: int, pads: Pads, dilation: int) -> dict[str, np.int64]:
    return {
        "stride": np.int64(stride),
        "dilation": np.int64(dilation),
        "pad_top": np.int64(pads[0][0]),
        "pad_left": np.int64(pads[1][0]),
    }


@functools.cache
def _operation(target: str, operand_kinds: tuple[str, str], rule: str, stride: int, pads: Pads,
               dilation: int, result_hw: tuple[int, int]):
    """One FFI target as a partitioned function of two operands. Every result is
    ``[N, *result_hw, C]`` with N and C of the first operand (the kernel gradient is per image)."""
    attrs = _attributes(stride, pads, dilation)

    def body(first, second):
        shape = jax.ShapeDtypeStruct((first.shape[0], *result_hw, first.shape[3]), first.dtype)
        return jax.ffi.ffi_call(target, shape)(first, second, **attrs)

    return partitioned(body, operand_kinds, "image", rule)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
        raise ValueError(f"depthwise: x {x.shape} must be [N,H,W,C] and kernel {kernel.shape} [kh,kw,1,C]")
    if max(kernel.shape[:2]) > MAX_KERNEL_SIZE:
        raise ValueError(
            f"the CPU depthwise kernels take kernels up to {MAX_KERNEL_SIZE}x{MAX_KERNEL_SIZE}, got "
            f"{kernel.shape[0]}x{kernel.shape[1]}; use impl='shift_add'"
        )
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(
            f"the CPU depthwise kernels take float32 only (got {x.dtype}, {kernel.dtype}); "
            "use impl=None or 'shift_add' for other dtypes"
        )
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"the CPU depthwise kernels are unavailable: {reason}")


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int) -> int:
    return (size + pads[0] + pads[1] - (kernel - 1) * dilation - 1) // stride + 1


def forward(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads, dilation: int = 1) -> jax.Array:
    """Depthwise correlation of ``x`` ``[N, H, W, C]`` with ``kernel`` ``[kh, kw, 1, C]``, zero
    padding ``pads`` ((top, bottom), (left, right)); returns ``[N, OH, OW, C]``."""
    _check(x, kernel)
    kh, kw = kernel.shape[:2]
    out_hw = (
        output_size(x.shape[1], kh, stride, pads[0], dilation),
        output_size(x.shape[2], kw, stride, pads[1], dilation),
    )
    forward_op = _operation("effdet_depthwise_forward", ("image", "kernel"), "n h w c, a b o c -> n i j c",
                            stride, pads, dilation, out_hw)
    return forward_op(x, kernel)


def input_grad(
    g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int], stride: int, pads: Pads, dilation: int = 1
) -> jax.Array:
    """The gradient of :func:`forward` with respect to ``x`` (``[N, *in_hw, C]``) for the output
    gradient ``g`` ``[N, OH, OW, C]``."""
    _check(g, kernel)
    input_grad_op = _operation("effdet_depthwise_input_grad", ("image", "kernel"),
                               "n i j c, a b o c -> n h w c", stride, pads, dilation, tuple(in_hw))
    return input_grad_op(g, kernel)


def kernel_grad(
    x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], stride: int, pads: Pads, dilation: int = 1
) -> jax.Array:
    """The gradient of :func:`forward` with respect to the kernel, ``[kh, kw, 1, C]``."""
    kernel_grad_op = _operation("effdet_depthwise_kernel_grad", ("image", "image"),
                                "n h w c, n i j c -> n a b c", stride, pads, dilation, tuple(kernel_hw))
    per_image = kernel_grad_op(x, g)
    return jnp.sum(per_image, axis=0)[:, :, None, :]
