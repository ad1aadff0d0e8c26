"""Depthwise convolution (depth multiplier 1) with TF ``SAME`` padding, in three implementations
with hand-written backward passes, and the choice between them.

Layouts: ``x`` ``[batch, height, width, channels]``, ``kernel`` ``[kh, kw, 1, channels]``; ``pads``
``((top, bottom), (left, right))``. All three implementations give the same values to float32
rounding:

* ``lax``: XLA's grouped convolution (GPU / TPU, and everywhere with ``cpu_kernels='off'``);
* ``cpu_ffi``: the hand-written XLA:CPU kernels (``effdet_jax.kernels.depthwise_cpu``, float32,
  kernels up to 16x16);
* ``shift_add``: a sum over the taps of strided input slices times per-channel weights (CPU for
  the cases the kernels do not take; XLA:CPU's grouped convolution is 15-20x slower).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.kernels import depthwise_cpu
from effdet_jax.ops import policy as policy_lib
from effdet_jax.ops.padding import same_pads

Pads = tuple[tuple[int, int], tuple[int, int]]
DEPTHWISE_IMPLS = ("lax", "shift_add", "cpu_ffi")


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, stride: int, dilation: int = 1, impl: str | None = None
) -> jax.Array:
    """Depthwise convolution with TF SAME padding.

    Args:
      x: ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]``.
      stride: spatial stride (same on both axes).
      impl: ``None`` (the models): chosen by the CPU-kernel policy (``ops.policy.current()``) and,
        inside the traced function, by platform: on CPU ``cpu_ffi`` where the kernels are on and
        take the operands, else ``shift_add``; elsewhere (and with the policy ``off``) ``lax``.
        One of :data:`DEPTHWISE_IMPLS` forces that implementation.
    Returns:
      ``[N, ceil(H/stride), ceil(W/stride), C]``.
    """
    pads = same_pads(x.shape, kernel.shape[0], kernel.shape[1], stride, dilation)
    if impl is None:
        policy = policy_lib.current()
        if not policy.cpu_paths:
            impl = "lax"
        else:
            takes_ffi = (
                policy.ffi and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
                and max(kernel.shape[:2]) <= depthwise_cpu.MAX_KERNEL_SIZE
            )
            cpu_impl = "cpu_ffi" if takes_ffi else "shift_add"
            return depthwise_by_platform(x, kernel, stride, pads, dilation, cpu_impl)
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; allowed: {DEPTHWISE_IMPLS}")
    return _VJPS[impl](x, kernel, stride, pads, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def depthwise_by_platform(x, kernel, stride: int, pads: Pads, dilation: int, cpu_impl: str):
    """``cpu_impl`` (``cpu_ffi`` or ``shift_add``) on CPU and ``lax`` elsewhere, forward and
    backward each selected with ``lax.platform_dependent``. Every implementation keeps the same
    residuals (``x``, ``kernel``), so the selection sits inside one custom VJP rather than
    around three."""
    return _by_platform_fwd(x, kernel, stride, pads, dilation, cpu_impl)[0]


def _by_platform_fwd(x, kernel, stride, pads, dilation, cpu_impl):
    cpu, default = _FORWARD[cpu_impl], _FORWARD["lax"]
    y = lax.platform_dependent(
        x, kernel,
        cpu=lambda x, k: cpu(x, k, stride, pads, dilation),
        default=lambda x, k: default(x, k, stride, pads, dilation),
    )
    return y, (x, kernel)


def _by_platform_bwd(stride, pads, dilation, cpu_impl, residuals, g):
    x, kernel = residuals
    cpu, default = _BACKWARD[cpu_impl], _BACKWARD["lax"]
    return lax.platform_dependent(
        x, kernel, g,
        cpu=lambda x, k, g: cpu(stride, pads, dilation, (x, k), g),
        default=lambda x, k, g: default(stride, pads, dilation, (x, k), g),
    )


depthwise_by_platform.defvjp(_by_platform_fwd, _by_platform_bwd)


def _depthwise_ffi(x, kernel, stride, pads, dilation):
    return depthwise_cpu.forward(x, kernel, stride, pads, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_cpu_ffi(x, kernel, stride: int, pads: Pads, dilation: int):
    """The hand-written XLA:CPU kernels: forward, input gradient and kernel gradient each one
    pass. On D0's backbone shapes the backward is 2.5x faster than shift-and-add's and the forward
    about as fast (both memory-bound); see benchmarks/RESULTS.md."""
    return _depthwise_ffi(x, kernel, stride, pads, dilation)


def _depthwise_cpu_ffi_fwd(x, kernel, stride, pads, dilation):
    return _depthwise_ffi(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_cpu_ffi_bwd(stride, pads, dilation, residuals, g):
    x, kernel = residuals
    gx = depthwise_cpu.input_grad(g, kernel, x.shape[1:3], stride, pads, dilation)
    gk = depthwise_cpu.kernel_grad(x, g, kernel.shape[:2], stride, pads, dilation)
    return gx, gk


depthwise_cpu_ffi.defvjp(_depthwise_cpu_ffi_fwd, _depthwise_cpu_ffi_bwd)


def depthwise_lax_plain(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads, dilation: int) -> jax.Array:
    """XLA's grouped convolution, differentiated by autodiff."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=pads,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_lax(x, kernel, stride: int, pads: Pads, dilation: int):
    """XLA's grouped convolution, with the kernel gradient taken as one multiply-reduce per tap.

    Autodiff would take the kernel gradient as a ``batch_group_count`` convolution, which XLA's
    SPMD partitioner (jax 0.12) gets wrong on a mesh with an axis the batch is not sharded along:
    on a 4x2 data x model mesh it comes out exactly 2x too large, so training on such a mesh
    would diverge from one device. The per-tap reductions partition like any reduction over the
    batch.
    """
    return depthwise_lax_plain(x, kernel, stride, pads, dilation)


def _depthwise_lax_fwd(x, kernel, stride, pads, dilation):
    return depthwise_lax_plain(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_lax_bwd(stride, pads, dilation, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda v: depthwise_lax_plain(v, kernel, stride, pads, dilation), x)
    (gx,) = input_vjp(g)
    gk = _depthwise_kernel_grad(x, g, kernel.shape[0], kernel.shape[1], stride, pads, dilation)
    return gx, gk.astype(kernel.dtype)


depthwise_lax.defvjp(_depthwise_lax_fwd, _depthwise_lax_bwd)


def depthwise_shift_add_plain(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads,
                              dilation: int) -> jax.Array:
    """Shift-and-add depthwise convolution, differentiated by autodiff."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    return _shift_add(xp, kernel, stride, dilation)


def _shift_add(xp, kernel, stride, dilation):
    """Valid depthwise correlation of an already padded ``xp`` ``[N, Hp, Wp, C]``: the sum over
    the taps of strided slices of ``xp`` times the tap's per-channel weights."""
    n, hp, wp, c = xp.shape
    kh, kw = kernel.shape[0], kernel.shape[1]
    out_h = (hp - (kh - 1) * dilation - 1) // stride + 1
    out_w = (wp - (kw - 1) * dilation - 1) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, out_h, out_w, stride, dilation) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_shift_add(x, kernel, stride: int, pads: Pads, dilation: int):
    """Shift-and-add depthwise convolution with a hand-written backward pass.

    Autodiff of the shift-and-add forward turns every tap into a padded full-size array (the
    transpose of a strided slice) and sums them: on XLA:CPU that backward pass costs ~7x the
    forward. Here the input gradient is itself one shift-and-add (the output gradient, dilated by
    the stride and padded once, correlated with the flipped kernel) and the kernel gradient one
    multiply-reduce per tap. Same values as autodiff up to float32 summation order.
    """
    return depthwise_shift_add_plain(x, kernel, stride, pads, dilation)


def _depthwise_shift_add_fwd(x, kernel, stride, pads, dilation):
    # No optimization_barrier on the output here: with one, XLA:CPU (jax 0.12) returns wrong
    # forward values inside a full EfficientNet train step, and it buys no measurable speed.
    return depthwise_shift_add_plain(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_shift_add_bwd(stride, pads, dilation, residuals, g):
    x, kernel = residuals
    # ``g`` feeds the input gradient and every tap's kernel-gradient reduction; without the
    # barrier XLA fuses (recomputes) the whole element-wise chain behind it (BN and activation
    # backward) into each of those kh*kw+1 consumers.
    g = lax.optimization_barrier(g)
    kh, kw = kernel.shape[0], kernel.shape[1]
    # Forward: y[i] = sum_a xp[i*s + a*d] w[a] with xp[p] = x[p - before]. Its transpose:
    # gx[u] = sum_a gd[u + before - a*d] w[a], gd = g dilated by s (s-1 zeros between rows).
    # Flipping the kernel makes that a valid correlation of gd padded by ((k-1)*d - before,
    # size + before - len(gd)) on each spatial axis; lax.pad dilates and pads in one op.
    cfg = [(0, 0, 0)]
    for axis, k, (before, _) in ((1, kh, pads[0]), (2, kw, pads[1])):
        dilated = (g.shape[axis] - 1) * stride + 1
        cfg.append(((k - 1) * dilation - before, x.shape[axis] + before - dilated, stride - 1))
    cfg.append((0, 0, 0))
    gp = lax.pad(g, jnp.zeros((), g.dtype), cfg)
    gx = _shift_add(gp, kernel[::-1, ::-1], 1, dilation)
    gk = _depthwise_kernel_grad(x, g, kh, kw, stride, pads, dilation)
    return gx, gk.astype(kernel.dtype)


depthwise_shift_add.defvjp(_depthwise_shift_add_fwd, _depthwise_shift_add_bwd)


def _tap(xp, i, j, out_h, out_w, stride, dilation):
    """The input pixels that kernel tap (i, j) meets: a strided ``[N, out_h, out_w, C]`` slice of
    the padded input ``xp``."""
    n, _, _, c = xp.shape
    y0, x0 = i * dilation, j * dilation
    return lax.slice(
        xp,
        (0, y0, x0, 0),
        (n, y0 + (out_h - 1) * stride + 1, x0 + (out_w - 1) * stride + 1, c),
        (1, stride, stride, 1),
    )


def _depthwise_kernel_grad(x, g, kh, kw, stride, pads, dilation, parts: int = 8):
    """``gk[a, b, 0, c] = sum_{n,i,j} xp[n, i*s + a*d, j*s + b*d, c] * g[n, i, j, c]``.

    XLA:CPU's reduction over the major axes is compute-bound (well under 1 GFLOP/s), so one
    element-wise pass first folds the output rows into ``parts`` groups for all taps together
    (``[N, rows / parts, W, kh*kw, C]``; it reads ``x`` and ``g`` once and vectorises over ``C``),
    and a single reduction finishes: 1.5-1.9x faster than one reduction per tap on the D0
    backbone's shapes. Zero rows pad ``g`` (and ``x`` below) to a multiple of ``parts``.
    """
    n, out_h, out_w, c = g.shape
    parts = max(1, min(parts, out_h))
    rows = -(-out_h // parts)
    extra = rows * parts - out_h
    g = jnp.pad(g, ((0, 0), (0, extra), (0, 0), (0, 0)))
    xp = jnp.pad(x, ((0, 0), (pads[0][0], pads[0][1] + extra * stride), pads[1], (0, 0)))
    folded_taps = []
    for i in range(kh):
        for j in range(kw):
            tap = _tap(xp, i, j, rows * parts, out_w, stride, dilation)
            product = (tap * g).reshape(n, parts, rows, out_w, c)
            folded = product[:, 0]
            for part in range(1, parts):
                folded = folded + product[:, part]
            folded_taps.append(folded)
    return jnp.sum(jnp.stack(folded_taps, axis=-2), axis=(0, 1, 2)).reshape(kh, kw, 1, c)


_VJPS = {"lax": depthwise_lax, "shift_add": depthwise_shift_add, "cpu_ffi": depthwise_cpu_ffi}
_FORWARD = {"lax": depthwise_lax_plain, "shift_add": depthwise_shift_add_plain, "cpu_ffi": _depthwise_ffi}
_BACKWARD = {
    "lax": _depthwise_lax_bwd, "shift_add": _depthwise_shift_add_bwd, "cpu_ffi": _depthwise_cpu_ffi_bwd,
}
