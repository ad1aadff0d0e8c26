"""Depthwise convolution (``effdet_jax.ops.depthwise``) against TensorFlow's and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.kernels import cpu_library
from effdet_jax.ops.depthwise import depthwise_conv
from effdet_jax.ops.padding import tf_same_padding
from effdet_jax.ops.policy import cpu_kernels


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
    out = np.asarray(depthwise_conv(jnp.asarray(x), jnp.asarray(w), stride, impl=impl))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_impls_have_identical_gradients(stride):
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 6)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((2, 5 if stride == 2 else 9, 5 if stride == 2 else 10, 6)))

    def loss(impl):
        return lambda x, w: jnp.sum(depthwise_conv(x, w, stride, impl=impl) * t)

    def autodiff_reference(x, w):  # XLA's own grouped conv, differentiated by JAX
        pads = (tf_same_padding(9, 3, stride), tf_same_padding(10, 3, stride))
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), pads, feature_group_count=6,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * t)

    g_ref = jax.grad(autodiff_reference, argnums=(0, 1))(x, w)
    for impl in ("lax", "shift_add") + (("cpu_ffi",) if cpu_library.available() else ()):
        grads = jax.grad(loss(impl), argnums=(0, 1))(x, w)
        for a, b in zip(grads, g_ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["lax", "shift_add", "cpu_ffi"])
def test_depthwise_gradients_on_a_data_by_model_mesh(impl, request):
    """Batch sharded over ``data`` of a 4x2 mesh, kernel replicated: the kernel gradient must be
    the single-device one. (Autodiff of XLA's grouped conv gives exactly 2x it here: the SPMD
    partitioner sums the batch reduction over the ``model`` axis too.)"""
    if impl == "cpu_ffi":
        request.getfixturevalue("cpu_depthwise_kernel")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 12, 12, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 16)), jnp.float32)

    def loss(x, w):
        return jnp.sum(jnp.sin(depthwise_conv(x, w, 1, impl=impl)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref = grad(x, w)
    shardings = (NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))
    sharded = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=shardings)(x, w)
    for a, b in zip(sharded, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "off"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_policy_chooses_the_implementation_inside_the_traced_function(mode, dtype):
    """With the policy ``off`` the depthwise is XLA's grouped convolution everywhere; otherwise
    a ``platform_dependent`` choice whose CPU branch is the FFI kernel (float32, kernels built)
    or shift-and-add. Values and gradients agree with the grouped convolution either way."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 10, 6)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 6)), dtype)

    def loss(impl):
        return lambda x, w: jnp.sum(depthwise_conv(x, w, 2, impl=impl).astype(jnp.float32) ** 2)

    with cpu_kernels(mode) as policy:
        chosen = jax.jit(jax.value_and_grad(loss(None), argnums=(0, 1)))
        hlo = chosen.lower(x, w).compile().as_text()
        value, grads = chosen(x, w)
    ffi = "effdet_depthwise_" in hlo
    assert ffi == (policy.ffi and dtype == jnp.float32 and jax.default_backend() == "cpu")
    ref_value, ref_grads = jax.value_and_grad(loss("lax"), argnums=(0, 1))(x, w)
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(float(value), float(ref_value), rtol=tol)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(b.astype(jnp.float32)))))


def test_unknown_impl_is_an_error():
    with pytest.raises(ValueError, match="unknown depthwise impl"):
        depthwise_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 1, 2)), 1, impl="fft")
