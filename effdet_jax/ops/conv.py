"""Dense convolutions with TF ``SAME`` padding: ``x`` ``[batch, height, width, in]``, kernel HWIO
``[kh, kw, in, out]``.

* :func:`conv2d`: the general case; 1x1 stride-1 goes to :func:`pointwise_conv`, and on CPU a
  convolution with few inputs per output (the stem: 3x3 over RGB) takes its kernel gradient as a
  matmul of the patches (:func:`conv_patches_kernel_grad`).
* :func:`pointwise_conv`: ``[..., in] x [in, out]`` as one matmul with a hand-written backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.ops import policy as policy_lib
from effdet_jax.ops.padding import same_pads

Pads = tuple[tuple[int, int], tuple[int, int]]

# Convolutions with at most this many inputs per output (kh * kw * Cin; the stem's 3x3x3 = 27)
# take their kernel gradient on CPU as a matmul of the patches.
PATCHES_MAX_DEPTH = 32


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Dense 2D convolution with TF SAME padding; ``x`` ``[N, H, W, Cin]``, ``kernel``
    ``[kh, kw, Cin, Cout]``; returns ``[N, ceil(H/stride), ceil(W/stride), Cout]``.

    1x1 stride-1 convolutions are one matmul over ``[N*H*W, Cin]`` (:func:`pointwise_conv`). With
    the CPU-kernel policy not ``off``, convolutions with at most ``PATCHES_MAX_DEPTH`` inputs per
    output take their kernel gradient on CPU as a patch matmul (:func:`conv_by_platform`).
    """
    kh, kw, cin, cout = kernel.shape
    if kh == 1 and kw == 1 and stride == 1:
        return pointwise_conv(x, kernel[0, 0])
    pads = same_pads(x.shape, kh, kw, stride)
    if kh * kw * cin <= PATCHES_MAX_DEPTH and policy_lib.current().cpu_paths:
        return conv_by_platform(x, kernel, stride, pads)
    return conv_plain(x, kernel, stride, pads)


def conv_plain(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, explicit ``pads``), differentiated by autodiff."""
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_by_platform(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """:func:`conv_plain` whose kernel gradient is :func:`conv_patches_kernel_grad`'s on CPU and
    the convolution's own elsewhere (``lax.platform_dependent`` in the backward pass)."""
    return conv_plain(x, kernel, stride, pads)


def _conv_fwd(x, kernel, stride, pads):
    return conv_plain(x, kernel, stride, pads), (x, kernel)


def _conv_by_platform_bwd(stride, pads, residuals, dy):
    x, kernel = residuals
    return lax.platform_dependent(
        x, kernel, dy,
        cpu=lambda x, k, dy: _conv_patches_bwd(stride, pads, (x, k), dy),
        default=lambda x, k, dy: jax.vjp(lambda x, k: conv_plain(x, k, stride, pads), x, k)[1](dy),
    )


conv_by_platform.defvjp(_conv_fwd, _conv_by_platform_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patches_kernel_grad(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads) -> jax.Array:
    """:func:`conv_plain` whose kernel gradient is ``patches^T dy``: the
    ``[N*OH*OW, kh*kw*Cin]`` patches (strided slices of the padded input, in HWIO order)
    contracted with ``dy [N*OH*OW, Cout]`` in one matmul.

    Why: XLA:CPU's kernel gradient of the stem (3x3, stride 2, 3 input channels) is a convolution
    over the whole batch that runs at a fraction of its matmul speed (benchmarks/RESULTS.md). The
    forward pass and the input gradient stay XLA's convolutions (the forward is faster as one).
    """
    return conv_plain(x, kernel, stride, pads)


def _conv_patches_bwd(stride, pads, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    _, conv_vjp = jax.vjp(lambda x: conv_plain(x, kernel, stride, pads), x)
    (dx,) = conv_vjp(dy)  # XLA drops it when x needs no gradient (the images)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h, out_w = dy.shape[1], dy.shape[2]
    taps = [
        lax.slice(
            xp, (0, a, b, 0),
            (xp.shape[0], a + (out_h - 1) * stride + 1, b + (out_w - 1) * stride + 1, cin),
            (1, stride, stride, 1),
        )
        for a in range(kh) for b in range(kw)
    ]
    patches = jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * cin)
    dk = lax.dot_general(patches, dy.reshape(-1, cout), (((0,), (0,)), ((), ())))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv_patches_kernel_grad.defvjp(_conv_fwd, _conv_patches_bwd)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution ``[..., Cin] x [Cin, Cout] -> [..., Cout]`` as one matmul, with a
    hand-written backward pass.

    The backward pass computes ``dx = dy W^T`` and ``dW = x^T dy`` as plain ``dot_general`` on
    ``[rows, C]`` views (contracting the row axis of both for ``dW``), after materialising ``dy``
    once. Autodiff of the einsum leaves XLA:CPU to transpose ``dy`` into a ``[Cout, rows]`` copy
    and to recompute the element-wise chain behind ``dy`` (BN / activation / loss backward) into
    both matmul operands. The values are the same matmuls.
    """
    return _pointwise_fwd(x, kernel)[0]


def _pointwise_fwd(x, kernel):
    cin, cout = kernel.shape
    y = lax.dot_general(x.reshape(-1, cin), kernel, (((1,), (0,)), ((), ())))
    return y.reshape(*x.shape[:-1], cout), (x, kernel)


def _pointwise_bwd(residuals, dy):
    x, kernel = residuals
    cin, cout = kernel.shape
    dy2 = lax.optimization_barrier(dy.reshape(-1, cout))
    x2 = x.reshape(-1, cin)
    dx = lax.dot_general(dy2, kernel, (((1,), (1,)), ((), ())))
    dk = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dk.astype(kernel.dtype)


pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)
