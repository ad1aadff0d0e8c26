"""Building blocks shared by EfficientNet and EfficientDet.

Everything is NHWC: activations are ``[batch, height, width, channels]`` and kernels are HWIO
(``[kh, kw, in, out]``; depthwise kernels ``[kh, kw, 1, channels]``). Padding is TensorFlow's
``SAME`` (for stride 2 on an even size: 0 before, 1 after), which is what the automl and timm ``tf_*``
checkpoints were trained with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from effdet_jax.kernels import depthwise_cpu
from effdet_jax.models.batch_norm import BatchNorm

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

DEPTHWISE_IMPLS = ("auto", "lax", "shift_add", "cpu_ffi")


def tf_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one spatial axis: the output has ceil(size/stride)
    positions and the odd pixel of padding goes after."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


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
    see ``models/batch_norm.py``). Statistics are float32 whatever the compute dtype.

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


def resolve_depthwise_impl(impl: str, dtype: Any = jnp.float32) -> str:
    """The depthwise implementation that ``impl`` means for activations of ``dtype``.

    ``auto`` picks, on CPU, the hand-written FFI kernel (``cpu_ffi``, float32, when it builds) and
    otherwise shift-and-add (XLA's grouped conv is 15-20x slower there); on GPU / TPU it picks lax's
    grouped convolution.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise_impl {impl!r}; allowed: {DEPTHWISE_IMPLS}")
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "lax"
        return "cpu_ffi" if jnp.dtype(dtype) == jnp.float32 and depthwise_cpu.available() else "shift_add"
    return impl


def depthwise_conv(
    x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto", dilation: int = 1
) -> jax.Array:
    """Depthwise convolution with TF SAME padding.

    Args:
      x: ``[N, H, W, C]``.
      kernel: ``[kh, kw, 1, C]``.
      stride: spatial stride (same on both axes).
      impl: ``lax`` (grouped ``conv_general_dilated``), ``shift_add`` (a sum over the kh*kw taps of
        strided input slices times per-channel weights), ``cpu_ffi`` (a hand-written XLA:CPU kernel,
        float32; ``effdet_jax.kernels.depthwise_cpu``) or ``auto``. All give the same result to
        float32 rounding.
    Returns:
      ``[N, ceil(H/stride), ceil(W/stride), C]``.
    """
    impl = resolve_depthwise_impl(impl, x.dtype)
    kh, kw = kernel.shape[0], kernel.shape[1]
    pads = (
        tf_same_padding(x.shape[1], kh, stride, dilation),
        tf_same_padding(x.shape[2], kw, stride, dilation),
    )
    if impl == "lax":
        return depthwise_lax_vjp(x, kernel, stride, pads, dilation)
    if impl == "cpu_ffi":
        return depthwise_cpu_ffi_vjp(x, kernel, stride, pads, dilation)
    return depthwise_shift_add_vjp(x, kernel, stride, pads, dilation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise_cpu_ffi_vjp(x, kernel, stride, pads, dilation):
    """The hand-written XLA:CPU kernels: forward, input gradient and kernel gradient each one
    pass. On D0's backbone shapes the backward is 2.5x faster than shift-and-add's and the forward
    about as fast (both memory-bound); see benchmarks/RESULTS.md."""
    return depthwise_cpu.forward(x, kernel, stride, pads, dilation)


def _depthwise_cpu_ffi_fwd(x, kernel, stride, pads, dilation):
    return depthwise_cpu.forward(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_cpu_ffi_bwd(stride, pads, dilation, residuals, g):
    x, kernel = residuals
    gx = depthwise_cpu.input_grad(g, kernel, x.shape[1:3], stride, pads, dilation)
    gk = depthwise_cpu.kernel_grad(x, g, kernel.shape[:2], stride, pads, dilation)
    return gx, gk


depthwise_cpu_ffi_vjp.defvjp(_depthwise_cpu_ffi_fwd, _depthwise_cpu_ffi_bwd)


def _depthwise_lax(x, kernel, stride, pads, dilation):
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
def depthwise_lax_vjp(x, kernel, stride, pads, dilation):
    """XLA's grouped convolution, with the kernel gradient taken as one multiply-reduce per tap.

    Autodiff would take the kernel gradient as a ``batch_group_count`` convolution, which XLA's
    SPMD partitioner (jax 0.12) gets wrong on a mesh with an axis the batch is not sharded along:
    on a 4x2 data x model mesh it came out exactly 2x too large, so training on such a mesh
    diverged from one device. The per-tap reductions partition like any reduction over the batch.
    """
    return _depthwise_lax(x, kernel, stride, pads, dilation)


def _depthwise_lax_fwd(x, kernel, stride, pads, dilation):
    return _depthwise_lax(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_lax_bwd(stride, pads, dilation, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda v: _depthwise_lax(v, kernel, stride, pads, dilation), x)
    (gx,) = input_vjp(g)
    gk = _depthwise_kernel_grad(x, g, kernel.shape[0], kernel.shape[1], stride, pads, dilation)
    return gx, gk.astype(kernel.dtype)


depthwise_lax_vjp.defvjp(_depthwise_lax_fwd, _depthwise_lax_bwd)


def _depthwise_shift_add(x, kernel, stride, pads, dilation):
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
def depthwise_shift_add_vjp(x, kernel, stride, pads, dilation):
    """Shift-and-add depthwise convolution with a hand-written backward pass.

    Autodiff of the shift-and-add forward turns every tap into a padded full-size array (the
    transpose of a strided slice) and sums them: on XLA:CPU that backward pass costs ~7x the
    forward. Here the input gradient is itself one shift-and-add (the output gradient, dilated by
    the stride and padded once, correlated with the flipped kernel) and the kernel gradient one
    multiply-reduce per tap. Same values as autodiff up to float32 summation order.
    """
    return _depthwise_shift_add(x, kernel, stride, pads, dilation)


def _depthwise_vjp_fwd(x, kernel, stride, pads, dilation):
    # No optimization_barrier on the output here: with one, XLA:CPU (jax 0.12) returned wrong
    # forward values inside a full EfficientNet train step (caught by
    # test_fast_layers_match_autodiff_in_a_model), and it bought no measurable speed.
    return _depthwise_shift_add(x, kernel, stride, pads, dilation), (x, kernel)


def _depthwise_vjp_bwd(stride, pads, dilation, residuals, g):
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


depthwise_shift_add_vjp.defvjp(_depthwise_vjp_fwd, _depthwise_vjp_bwd)


# Convolutions with at most this many inputs per output (kh * kw * Cin; the stem's 3x3x3 = 27)
# take their kernel gradient on CPU as a matmul of the patches.
PATCHES_MAX_DEPTH = 32


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """Dense 2D convolution with TF SAME padding; ``x`` NHWC, ``kernel`` HWIO.

    1x1 stride-1 convolutions are computed as a matmul over ``[N*H*W, Cin]``, XLA CPU's faster path
    (``pointwise_conv``). On CPU, convolutions with few inputs per output (the stem: 3x3 over RGB)
    take their kernel gradient as a matmul of the patches (``conv_patches_kernel_grad``).
    """
    kh, kw, cin, cout = kernel.shape
    if kh == 1 and kw == 1 and stride == 1:
        return pointwise_conv(x, kernel[0, 0])
    pads = (
        tf_same_padding(x.shape[1], kh, stride),
        tf_same_padding(x.shape[2], kw, stride),
    )
    if jax.default_backend() == "cpu" and kh * kw * cin <= PATCHES_MAX_DEPTH:
        return conv_patches_kernel_grad(x, kernel, stride, pads)
    return _conv(x, kernel, stride, pads)


def _conv(x, kernel, stride, pads):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patches_kernel_grad(x: jax.Array, kernel: jax.Array, stride: int, pads) -> jax.Array:
    """``lax.conv_general_dilated`` (NHWC, HWIO, explicit ``pads``) whose kernel gradient is
    ``patches^T dy``: the ``[N*OH*OW, kh*kw*Cin]`` patches (strided slices of the padded input, in
    HWIO order) contracted with ``dy [N*OH*OW, Cout]`` in one matmul.

    Why: XLA:CPU's kernel gradient of the stem (3x3, stride 2, 3 input channels) is a convolution
    over the whole batch that ran at a fraction of its matmul speed: D0 at 512 batch 4, forward
    and kernel gradient 25 ms as convolutions, 15 ms this way (benchmarks/RESULTS.md). The
    forward pass and the input gradient stay XLA's convolutions (the forward is faster as one).
    """
    return _conv(x, kernel, stride, pads)


def _conv_patches_fwd(x, kernel, stride, pads):
    return _conv(x, kernel, stride, pads), (x, kernel)


def _conv_patches_bwd(stride, pads, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    _, conv_vjp = jax.vjp(lambda x: _conv(x, kernel, stride, pads), x)
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


conv_patches_kernel_grad.defvjp(_conv_patches_fwd, _conv_patches_bwd)


@jax.custom_vjp
def pointwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """1x1 convolution ``[..., Cin] x [Cin, Cout] -> [..., Cout]`` as one matmul, with a
    hand-written backward pass.

    The backward pass computes ``dx = dy W^T`` and ``dW = x^T dy`` as plain ``dot_general`` on
    ``[rows, C]`` views (contracting the row axis of both for ``dW``), after materialising ``dy``
    once. Autodiff of the einsum left XLA:CPU to transpose ``dy`` into a ``[Cout, rows]`` copy
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


def drop_weights(kernel: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """DropConnect on weights (Wan et al. 2013): zero each kernel entry with probability ``rate`` and
    rescale the rest by 1/(1-rate), so the expected output is unchanged."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, kernel.shape)
    return jnp.where(keep, kernel / (1.0 - rate), jnp.zeros_like(kernel))


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
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32
        )
        if train and self.weight_drop_rate > 0.0:
            kernel = drop_weights(kernel, self.weight_drop_rate, self.make_rng("dropout"))
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
    impl: str = "auto"
    kernel_init: Callable = depthwise_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.impl)


class SeparableConv2D(nn.Module):
    """Depthwise k x k then pointwise 1x1 (with bias), as ``tf.keras.layers.SeparableConv2D``.

    Parameters: ``depthwise/kernel`` ``[k,k,1,C]``, ``pointwise/kernel`` ``[1,1,C,features]`` and
    ``pointwise/bias``.
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    depthwise_impl: str = "auto"
    depthwise_kernel_init: Callable = depthwise_kernel_init
    pointwise_kernel_init: Callable = conv_kernel_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = DepthwiseConv2D(
            self.kernel_size, 1, self.dtype, self.depthwise_impl, self.depthwise_kernel_init,
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


def max_pool_same(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
    """Max pooling with TF SAME padding (padding never wins the max); ``x`` NHWC.

    The gradient goes to the first maximum of each window in row-major order, as XLA's
    ``select_and_scatter`` (what ``jax.grad`` of ``lax.reduce_window`` gives) does, but it is
    computed tap by tap from strided slices (``_max_pool_bwd``): XLA:CPU lowers
    ``select_and_scatter`` to a variadic reduce-window that carries four index arrays, and the
    BiFPN's ``[4, 80, 80, 88]`` pool took 26 ms of backward pass that way (D1 640 train step).
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


def resize_nearest_legacy(x: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour resize with TF1's legacy index rule ``src = floor(dst * in / out)``
    (``tf.compat.v1.image.resize_nearest_neighbor``, align_corners=False, no half-pixel centres).

    This differs from ``jax.image.resize(..., 'nearest')`` when the ratio is not an integer (e.g.
    3 -> 5 gives rows [0, 0, 1, 1, 2] here, [0, 0, 1, 2, 2] there). ``x`` is NHWC.
    """
    in_h, in_w = x.shape[1], x.shape[2]
    rows = _legacy_nearest_index(in_h, height)
    cols = _legacy_nearest_index(in_w, width)
    if height % in_h == 0 and width % in_w == 0 and height // in_h == width // in_w:
        # Integer upsampling: a repeat is the same gather and much cheaper to differentiate.
        f = height // in_h
        return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


@functools.cache
def _legacy_nearest_index(size_in: int, size_out: int):
    import numpy as np

    # TF computes the scale in float32 and floors; min() guards the last index.
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, size_in - 1)
