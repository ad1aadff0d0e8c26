"""The hand-written XLA:CPU depthwise kernels (``effdet_jax.kernels.depthwise_cpu``).

Forward against TensorFlow's ``depthwise_conv2d`` (an independent implementation of "SAME"),
gradients against autodiff of XLA's grouped convolution, sharded use (as the models call it,
through ``lax.platform_dependent``) against one device, and the kernels' input checks.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effdet_jax.kernels import depthwise_cpu
from effdet_jax.ops.depthwise import depthwise_conv, depthwise_cpu_ffi
from effdet_jax.ops.padding import tf_same_padding
from effdet_jax.ops.policy import cpu_kernels

# (batch, height, width, channels), kernel, stride, dilation. Channel counts that take the
# kernels' 16-wide and 8-wide vectors and the scalar remainder (16, 24 = 16 + 8, 13 = 8 + 5,
# 29 = 16 + 8 + 5); maps smaller than the kernel; odd and even sizes.
CASES = [
    ((2, 9, 10, 16), 3, 1, 1),
    ((2, 9, 10, 16), 3, 2, 1),
    ((3, 16, 16, 24), 3, 2, 1),
    ((2, 11, 7, 13), 5, 1, 1),
    ((2, 12, 13, 40), 5, 2, 1),
    ((2, 10, 10, 8), 3, 1, 2),
    ((1, 1, 1, 8), 3, 2, 1),
    ((2, 2, 3, 5), 5, 1, 1),
    # Wide enough for several groups of the interior fast paths (and an odd remainder).
    ((2, 9, 37, 32), 5, 1, 1),
    ((2, 11, 23, 48), 3, 2, 1),
    ((1, 6, 30, 16), 5, 2, 1),
    ((2, 7, 9, 29), 3, 2, 1),
    ((2, 8, 11, 29), 3, 1, 1),
]


pytestmark = pytest.mark.usefixtures("cpu_depthwise_kernel")


def _inputs(shape, kernel, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((kernel, kernel, 1, shape[-1])).astype(np.float32)
    return x, w


def _pads(shape, kernel, stride, dilation):
    return tuple(tf_same_padding(s, kernel, stride, dilation) for s in shape[1:3])


@pytest.mark.parametrize("shape,kernel,stride,dilation", CASES)
def test_forward_matches_tensorflow(shape, kernel, stride, dilation):
    x, w = _inputs(shape, kernel)
    ref = tf.nn.depthwise_conv2d(
        x, np.transpose(w, (0, 1, 3, 2)), strides=[1, stride, stride, 1], padding="SAME",
        dilations=[dilation, dilation],
    ).numpy()
    pads = _pads(shape, kernel, stride, dilation)
    out = depthwise_cpu.forward(jnp.asarray(x), jnp.asarray(w), stride, pads, dilation)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,kernel,stride,dilation", CASES)
def test_gradients_equal_autodiff_of_grouped_conv(shape, kernel, stride, dilation):
    x, w = (jnp.asarray(a) for a in _inputs(shape, kernel, seed=1))
    pads = _pads(shape, kernel, stride, dilation)

    def grouped(x, w):
        return lax.conv_general_dilated(
            x, w, (stride, stride), pads, rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=shape[-1],
        )

    t = jnp.asarray(np.random.default_rng(2).standard_normal(grouped(x, w).shape), jnp.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * t), argnums=(0, 1)))(x, w)

    fast = grads(lambda x, w: depthwise_cpu_ffi(x, w, stride, pads, dilation))
    ref = grads(grouped)
    for a, b in zip(fast, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_results_are_bitwise_repeatable():
    """Fixed chunks and a fixed summation order: the kernel gradient must not depend on which
    thread took which rows."""
    x, w = (jnp.asarray(a) for a in _inputs((4, 33, 31, 24), 3, seed=3))
    pads = _pads(x.shape, 3, 2, 1)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(depthwise_cpu_ffi(x, w, 2, pads, 1))),
                            argnums=(0, 1)))
    first = grad(x, w)
    for _ in range(3):
        for a, b in zip(grad(x, w), first, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_batch_runs_per_device_and_matches_one_device():
    """Batch over ``data`` of a 4x2 mesh: values equal one device, the kernels see each device's
    quarter of the batch, and nothing is gathered (only the kernel gradient is all-reduced)."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    x, w = (jnp.asarray(a) for a in _inputs((8, 12, 12, 16), 3, seed=4))

    def loss(x, w):
        return jnp.sum(jnp.sin(depthwise_conv(x, w, 2)))

    grad = jax.grad(loss, argnums=(0, 1))
    with cpu_kernels("require"):
        ref = jax.jit(grad)(x, w)
        sharded = jax.jit(grad, in_shardings=(NamedSharding(mesh, PartitionSpec("data")),
                                              NamedSharding(mesh, PartitionSpec())))
        values = sharded(x, w)
        hlo = sharded.lower(x, w).compile().as_text()
    for a, b in zip(values, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    calls = [line for line in hlo.splitlines() if 'custom_call_target="effdet_depthwise' in line]
    assert len(calls) == 3
    assert all(re.search(r"= f32\[2,", line) for line in calls), calls
    assert "all-gather" not in hlo
    assert len(re.findall(r"all-reduce(?:-start)?\(", hlo)) >= 1


def test_the_kernels_take_float32_and_kernels_up_to_16x16():
    x, w = _inputs((1, 8, 8, 8), 3)
    with pytest.raises(ValueError, match="float32 only"):
        depthwise_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), 1, impl="cpu_ffi")
    with pytest.raises(ValueError, match="kernels up to 16x16"):
        depthwise_conv(jnp.asarray(x), jnp.ones((17, 17, 1, 8)), 1, impl="cpu_ffi")
