"""Layers against TensorFlow's own ops (the reference for 'SAME' padding and legacy resize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.kernels import depthwise_cpu
from effdet_jax.models import layers


@pytest.mark.parametrize("size", [7, 8, 15, 16, 33])
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (5, 2), (5, 1)])
def test_conv2d_matches_tf_same(size, kernel, stride):
    rng = np.random.default_rng(size * 10 + kernel + stride)
    x = rng.standard_normal((2, size, size + 1, 4)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 4, 6)).astype(np.float32)
    ref = tf.nn.conv2d(x, w, strides=stride, padding="SAME").numpy()
    out = np.asarray(layers.conv2d(jnp.asarray(x), jnp.asarray(w), stride))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [7, 16, 33])
@pytest.mark.parametrize("kernel,stride,cin", [(3, 2, 3), (3, 1, 3), (5, 2, 1)])
def test_small_conv_gradients_match_tensorflow(size, kernel, stride, cin):
    """Convolutions with few inputs per output (the stem: 3x3 over RGB) take their kernel
    gradient as a matmul of the patches on CPU: input and kernel gradients against TF's."""
    assert kernel * kernel * cin <= layers.PATCHES_MAX_DEPTH
    rng = np.random.default_rng(size + kernel + stride)
    x = rng.standard_normal((2, size, size + 1, cin)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, cin, 5)).astype(np.float32)
    t = rng.standard_normal(tf.nn.conv2d(x, w, strides=stride, padding="SAME").shape).astype(np.float32)
    xv, wv = tf.Variable(x), tf.Variable(w)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.nn.conv2d(xv, wv, strides=stride, padding="SAME") * t)
    ref_dx, ref_dw = (g.numpy() for g in tape.gradient(loss, [xv, wv]))
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.conv2d(x, w, stride) * t), argnums=(0, 1)))(
        jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [7, 8, 15, 16])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
@pytest.mark.parametrize("impl", ["lax", "shift_add", "cpu_ffi"])
def test_depthwise_matches_tf_same(size, kernel, stride, impl, request):
    if impl == "cpu_ffi":
        request.getfixturevalue("cpu_depthwise_kernel")
    rng = np.random.default_rng(size + kernel * 7 + stride)
    x = rng.standard_normal((2, size, size + 3, 5)).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 1, 5)).astype(np.float32)
    # TF's depthwise kernel is [kh, kw, C, multiplier].
    ref = tf.nn.depthwise_conv2d(
        x, np.transpose(w, (0, 1, 3, 2)), strides=[1, stride, stride, 1], padding="SAME"
    ).numpy()
    out = np.asarray(layers.depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride, impl))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_impls_have_identical_gradients(stride):
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 6)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 5 if stride == 2 else 9, 5 if stride == 2 else 10, 6)))

    def loss(impl):
        return lambda x, w: jnp.sum(layers.depthwise_conv(x, w, stride, impl) * t)

    def autodiff_reference(x, w):  # XLA's own grouped conv, differentiated by JAX
        pads = (layers.tf_same_padding(9, 3, stride), layers.tf_same_padding(10, 3, stride))
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), pads, feature_group_count=6,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * t)

    g_ref = jax.grad(autodiff_reference, argnums=(0, 1))(x, w)
    for impl in ("lax", "shift_add") + (("cpu_ffi",) if depthwise_cpu.available() else ()):
        grads = jax.grad(loss(impl), argnums=(0, 1))(x, w)
        for a, b in zip(grads, g_ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["lax", "shift_add", "cpu_ffi"])
def test_depthwise_gradients_on_a_data_by_model_mesh(impl, request):
    if impl == "cpu_ffi":
        request.getfixturevalue("cpu_depthwise_kernel")
    """Batch sharded over ``data`` of a 4x2 mesh, kernel replicated: the kernel gradient must be
    the single-device one. (Autodiff of XLA's grouped conv gave exactly 2x it here: the SPMD
    partitioner summed the batch reduction over the ``model`` axis too.)"""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 12, 12, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 16)), jnp.float32)

    def loss(x, w):
        return jnp.sum(jnp.sin(layers.depthwise_conv(x, w, 1, impl)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref = grad(x, w)
    shardings = (NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))
    sharded = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=shardings)(x, w)
    for a, b in zip(sharded, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_depthwise_impl_auto_and_bad_value():
    assert layers.resolve_depthwise_impl("auto") in ("lax", "shift_add", "cpu_ffi")
    if jax.default_backend() == "cpu":
        expected = "cpu_ffi" if depthwise_cpu.available() else "shift_add"
        assert layers.resolve_depthwise_impl("auto") == expected
    with pytest.raises(ValueError, match="depthwise_impl"):
        layers.resolve_depthwise_impl("fft")


@pytest.mark.parametrize("size", [3, 4, 5, 8, 9, 64])
def test_max_pool_matches_tf_same(size):
    x = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
    ref = tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME").numpy()
    np.testing.assert_array_equal(np.asarray(layers.max_pool_same(jnp.asarray(x))), ref)


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
        pads = ((0, 0), layers.tf_same_padding(shape[1], window, stride),
                layers.tf_same_padding(shape[2], window, stride), (0, 0))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                     (1, stride, stride, 1), pads)

    ref_xla = jax.vjp(pool_lax, jnp.asarray(x))[1](jnp.asarray(dy))[0]
    out, vjp = jax.vjp(lambda x: layers.max_pool_same(x, window, stride), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), y.numpy())
    dx = jax.jit(vjp)(jnp.asarray(dy))[0]
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(ref_xla))
    np.testing.assert_array_equal(np.asarray(dx), ref_tf)


@pytest.mark.parametrize("src,dst", [(3, 5), (5, 10), (4, 8), (10, 20), (20, 40), (5, 9), (7, 13)])
def test_legacy_nearest_resize_matches_tf1(src, dst):
    x = np.random.default_rng(src * dst).standard_normal((1, src, src, 2)).astype(np.float32)
    ref = tf.compat.v1.image.resize_nearest_neighbor(x, (dst, dst)).numpy()
    out = np.asarray(layers.resize_nearest_legacy(jnp.asarray(x), dst, dst))
    np.testing.assert_array_equal(out, ref)


def test_legacy_nearest_differs_from_half_pixel_rule():
    # automl quirk 4: 3 -> 5 picks rows [0, 0, 1, 1, 2]; jax.image.resize's half-pixel rule does not.
    x = jnp.arange(3.0).reshape(1, 3, 1, 1)
    ours = layers.resize_nearest_legacy(x, 5, 1)[0, :, 0, 0]
    np.testing.assert_array_equal(np.asarray(ours), [0, 0, 1, 1, 2])
    theirs = jax.image.resize(x, (1, 5, 1, 1), "nearest")[0, :, 0, 0]
    assert not np.array_equal(np.asarray(theirs), np.asarray(ours))


def test_tf_same_padding_formula():
    # out = ceil(in / stride); odd pixel of padding after.
    assert layers.tf_same_padding(8, 3, 2) == (0, 1)
    assert layers.tf_same_padding(7, 3, 2) == (1, 1)
    assert layers.tf_same_padding(5, 3, 2) == (1, 1)
    assert layers.tf_same_padding(9, 5, 1) == (2, 2)
    assert layers.tf_same_padding(8, 1, 2) == (0, 0)
