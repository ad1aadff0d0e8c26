"""The hand-written backward passes of the fast CPU layers equal autodiff of the plain formulation.

``depthwise_shift_add_vjp`` against autodiff of the shift-and-add forward (same forward code) and
of XLA's grouped convolution; ``pointwise_conv`` against autodiff of ``einsum``. Values must be
identical, gradients equal up to float32 summation order.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from effdet_jax.models import layers


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
    pads = tuple(layers.tf_same_padding(s, kernel, stride, dilation) for s in size)
    fast = lambda x, w: layers.depthwise_shift_add_vjp(x, w, stride, pads, dilation)  # noqa: E731
    plain = lambda x, w: layers._depthwise_shift_add(x, w, stride, pads, dilation)  # noqa: E731
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
    gx = jax.grad(lambda x: jnp.sum(layers.depthwise_shift_add_vjp(x, w, 2, pads, 1)))(x)
    expected = np.zeros((1, 6, 6, 2), np.float32)
    expected[:, ::2, ::2] = 1.0
    np.testing.assert_array_equal(np.asarray(gx), expected)


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 1, 1, 6), (4, 6)])
def test_pointwise_custom_vjp_equals_einsum(shape):
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
    plain = lambda x, w: jnp.einsum("...c,cd->...d", x, w)  # noqa: E731
    y = layers.pointwise_conv(x, w)
    np.testing.assert_allclose(np.asarray(y), np.asarray(plain(x, w)), rtol=1e-6, atol=1e-6)
    t = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    for a, b in zip(_grads(layers.pointwise_conv, x, w, t), _grads(plain, x, w, t), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_pointwise_custom_vjp_keeps_bfloat16():
    x = jnp.ones((2, 3, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    gx, gw = jax.grad(lambda x, w: jnp.sum(layers.pointwise_conv(x, w).astype(jnp.float32)),
                      argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gx, np.float32), np.full(x.shape, 5.0))
    np.testing.assert_array_equal(np.asarray(gw, np.float32), np.full(w.shape, 18.0))


def test_fast_layers_match_autodiff_in_a_model(monkeypatch):
    # The whole EfficientNet train-mode loss and gradients with the custom-VJP layers against the
    # same model built on plain autodiff layers (XLA may treat the custom rules differently once
    # they sit inside a large program, e.g. around optimization barriers).
    from effdet_jax import efficientnet

    model = efficientnet("efficientnet-b0", num_classes=4, depth_coefficient=0.25,
                         dropout_rate=0.0, drop_connect_rate=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)

    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                             train=True, mutable=["batch_stats"])
        return jnp.sum(out**2)

    fast_loss, fast_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    primal_loss = jax.jit(loss)(variables["params"])
    monkeypatch.setattr(layers, "depthwise_shift_add_vjp", layers._depthwise_shift_add)
    monkeypatch.setattr(layers, "pointwise_conv", lambda x, k: jnp.einsum("...c,cd->...d", x, k))
    plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    np.testing.assert_allclose(float(fast_loss), float(plain_loss), rtol=1e-5)
    np.testing.assert_allclose(float(primal_loss), float(plain_loss), rtol=1e-5)
    # Gradients up to float32 summation order, relative to the largest gradient entry (some BN
    # biases feed a train-mode BN and have a true gradient of 0: only rounding noise there).
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
    for a, b in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-5)
