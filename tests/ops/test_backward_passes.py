"""The hand-written backward passes of the fast CPU ops equal autodiff of the plain formulation.

``ops.depthwise.depthwise_shift_add`` against autodiff of the shift-and-add forward (same forward code) and
of XLA's grouped convolution; ``ops.conv.pointwise_conv`` against autodiff of ``einsum``. Values must be
identical, gradients equal up to float32 summation order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from effdet_jax.ops.conv import pointwise_conv
from effdet_jax.ops.depthwise import depthwise_shift_add, depthwise_shift_add_plain
from effdet_jax.ops.padding import tf_same_padding


def _grads(fn, x, w, t):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * t), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize(
    "size,kernel,stride,dilation",
    [((9, 10), 3, 1, 1), ((9, 10), 3, 2, 1), ((8, 8), 3, 2, 1), ((11, 7), 5, 1, 1),
     ((12, 13), 5, 2, 1), ((10, 10), 3, 1, 2), ((5, 6), 5, 2, 1)],
)
def test_depthwise_custom_vjp_equals_autodiff(size, kernel, stride, dilation):
    rng = np.random.default_rng(sum(size) * kernel + stride)
    x = jnp.asarray(rng.standard_normal((2, *size, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 6)), jnp.float32)
    pads = tuple(tf_same_padding(s, kernel, stride, dilation) for s in size)
    fast = lambda x, w: depthwise_shift_add(x, w, stride, pads, dilation)  # noqa: E731
    plain = lambda x, w: depthwise_shift_add_plain(x, w, stride, pads, dilation)  # noqa: E731
    grouped = lambda x, w: lax.conv_general_dilated(  # noqa: E731
        x, w, (stride, stride), pads, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
    )
    y = fast(x, w)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain(x, w)))
    t = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    g_fast = _grads(fast, x, w, t)
    for ref in (plain, grouped):
        for a, b in zip(g_fast, _grads(ref, x, w, t), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_depthwise_custom_vjp_zero_gradient_outside_receptive_field():
    # Stride 2 on an odd size reads every input pixel; on an even size with kernel 1 the odd rows
    # and columns are never read, so their gradient must be exactly zero.
    x = jnp.ones((1, 6, 6, 2), jnp.float32)
    w = jnp.ones((1, 1, 1, 2), jnp.float32)
    pads = ((0, 0), (0, 0))
    gx = jax.grad(lambda x: jnp.sum(depthwise_shift_add(x, w, 2, pads, 1)))(x)
    expected = np.zeros((1, 6, 6, 2), np.float32)
    expected[:, ::2, ::2] = 1.0
    np.testing.assert_array_equal(np.asarray(gx), expected)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 1, 1, 6), (4, 6)])
def test_pointwise_custom_vjp_equals_einsum(shape):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
    plain = lambda x, w: jnp.einsum("...c,cd->...d", x, w)  # noqa: E731
    y = pointwise_conv(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x, w)), rtol=1e-6, atol=1e-6)
    t = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for a, b in zip(_grads(pointwise_conv, x, w, t), _grads(plain, x, w, t), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_pointwise_custom_vjp_keeps_bfloat16():
    x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    gx, gw = jax.grad(lambda x, w: jnp.sum(pointwise_conv(x, w).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gx, np.float32), np.full(x.shape, 5.0))
    np.testing.assert_array_equal(np.asarray(gw, np.float32), np.full(w.shape, 18.0))


def test_fast_ops_match_plain_ops_in_a_model():
    # The whole EfficientNet train-mode loss and gradients with the CPU paths (policy ``auto``:
    # FFI kernels or shift-and-add, fused BN, patch-matmul stem) against the same model on XLA's
    # plain ops (``off``): XLA may treat the custom rules differently once they sit inside a
    # large program, e.g. around optimization barriers.
    from effdet_jax import efficientnet

    def model(mode):
        return efficientnet("efficientnet-b0", num_classes=4, depth_coefficient=0.25,
                            dropout_rate=0.0, drop_connect_rate=0.0, cpu_kernels=mode)

    # 64 pixels: at 32 the last blocks normalise over 2 images of 1x1 pixels, so ill-conditioned
    # that float32 rounding alone moves gradients by ~3e-3 between any two summation orders.
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = jax.jit(model("off").init)(jax.random.key(1), x)

    def loss(mode):
        def fn(params):
            out, _ = model(mode).apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                       train=True, mutable=["batch_stats"])
            return jnp.sum(out**2)

        return fn

    fast_loss, fast_grads = jax.jit(jax.value_and_grad(loss("auto")))(variables["params"])
    primal_loss = jax.jit(loss("auto"))(variables["params"])
    plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss("off")))(variables["params"])
    np.testing.assert_array_equal(float(fast_loss), float(primal_loss))
    np.testing.assert_allclose(float(fast_loss), float(plain_loss), rtol=1e-5)
    # Gradients up to float32 summation order, relative to the largest gradient entry (some BN
    # biases feed a train-mode BN and have a true gradient of 0: only rounding noise there).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
    errors = [float(jnp.max(jnp.abs(a - b))) / scale
              for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(plain_grads), strict=True)]
    assert max(errors) < 5e-5, max(errors)
