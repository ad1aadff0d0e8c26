"""Dense convolutions (``effdet_jax.ops.conv``) against TensorFlow's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.ops.conv import PATCHES_MAX_DEPTH, conv2d
from effdet_jax.ops.policy import cpu_kernels


@pytest.mark.parametrize("size", [7, 8, 15, 16, 33])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (5, 2), (5, 1)])
def test_conv2d_matches_tf_same(size, kernel, stride):
    rng = np.random.default_rng(size * 10 + kernel + stride)
    x = rng.standard_normal((2, size, size + 1, 4)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 4, 6)).astype(np.float32)
    ref = tf.nn.conv2d(x, w, strides=stride, padding="SAME").numpy()
    out = np.asarray(conv2d(jnp.asarray(x), jnp.asarray(w), stride))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [7, 16, 33])
@pytest.mark.parametrize("kernel,stride,cin", [(3, 2, 3), (3, 1, 3), (5, 2, 1)])
def test_small_conv_gradients_match_tensorflow(size, kernel, stride, cin):
    """Convolutions with few inputs per output (the stem: 3x3 over RGB) take their kernel
    gradient as a matmul of the patches on CPU: input and kernel gradients against TF's."""
    assert kernel * kernel * cin <= PATCHES_MAX_DEPTH
    rng = np.random.default_rng(size + kernel + stride)
    x = rng.standard_normal((2, size, size + 1, cin)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, cin, 5)).astype(np.float32)
    t = rng.standard_normal(tf.nn.conv2d(x, w, strides=stride, padding="SAME").shape).astype(np.float32)
    xv, wv = tf.Variable(x), tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.conv2d(xv, wv, strides=stride, padding="SAME") * t)
    ref_dx, ref_dw = (g.numpy() for g in tape.gradient(loss, [xv, wv]))
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(conv2d(x, w, stride) * t), argnums=(0, 1)))(
        jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_stem_kernel_gradient_is_a_patch_matmul_on_cpu_unless_off(mode):
    """The CPU branch (``platform_dependent``) takes the stem's kernel gradient as one matmul of
    the patches; with the policy ``off`` it is XLA's convolution gradient."""
    x = jnp.ones((2, 16, 16, 3))
    w = jnp.ones((3, 3, 3, 8))
    with cpu_kernels(mode) as policy:
        grad = jax.jit(jax.grad(lambda w: jnp.sum(conv2d(x, w, 2) ** 2)))
        hlo = grad.lower(w).as_text()
    patches = "dot_general" in hlo
    assert patches == (policy.cpu_paths and jax.default_backend() == "cpu")
