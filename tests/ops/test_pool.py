"""Max pooling (``effdet_jax.ops.pool``) against TensorFlow's and XLA's ``select_and_scatter``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.ops.padding import tf_same_padding
from effdet_jax.ops.pool import max_pool_same


@pytest.mark.parametrize("size", [3, 4, 5, 8, 9, 64])
def test_max_pool_matches_tf_same(size):
    x = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
    ref = tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME").numpy()
    np.testing.assert_array_equal(np.asarray(max_pool_same(jnp.asarray(x))), ref)


@pytest.mark.parametrize("shape,window,stride", [
    ((2, 9, 9, 3), 3, 2), ((2, 8, 11, 5), 3, 2), ((1, 64, 64, 16), 3, 2), ((2, 17, 17, 2), 5, 4),
    ((1, 40, 40, 3), 13, 12),  # 169 taps: the int32 tap index
])
def test_max_pool_gradient_matches_tf_and_select_and_scatter(shape, window, stride):
    """The hand-written backward pass of ``max_pool_same`` against TensorFlow's ``MaxPoolGrad``
    and XLA's ``select_and_scatter`` (autodiff of ``lax.reduce_window``). The input holds small
    integers, so most windows have ties: the gradient must go to the first maximum in row-major
    order. Integer cotangents keep every sum exact, so the comparison is exact too."""
    rng = np.random.default_rng(sum(shape) + window)
    x = rng.integers(-3, 3, shape).astype(np.float32)
    y = tf.nn.max_pool2d(x, ksize=window, strides=stride, padding="SAME")
    dy = rng.integers(-4, 5, y.shape).astype(np.float32)
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.max_pool2d(xv, ksize=window, strides=stride, padding="SAME") * dy)
    ref_tf = tape.gradient(loss, xv).numpy()

    def pool_lax(x):
        pads = ((0, 0), tf_same_padding(shape[1], window, stride),
                tf_same_padding(shape[2], window, stride), (0, 0))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                     (1, stride, stride, 1), pads)

    ref_xla = jax.vjp(pool_lax, jnp.asarray(x))[1](jnp.asarray(dy))[0]
    out, vjp = jax.vjp(lambda x: max_pool_same(x, window, stride), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), y.numpy())
    dx = jax.jit(vjp)(jnp.asarray(dy))[0]
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(ref_xla))
    np.testing.assert_array_equal(np.asarray(dx), ref_tf)
