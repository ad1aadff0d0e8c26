"""The hand-written XLA:CPU depthwise kernels (``effdet_jax.kernels.depthwise_cpu``).

Forward against TensorFlow's ``depthwise_conv2d`` (an independent implementation of "SAME"),
gradients against autodiff of XLA's grouped convolution, sharded use against one device, and the
fallback when no compiler is found.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from effdet_jax.kernels import depthwise_cpu
from effdet_jax.models import layers

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
    return tuple(layers.tf_same_padding(s, kernel, stride, dilation) for s in shape[1:3])


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

    fast = grads(lambda x, w: layers.depthwise_cpu_ffi_vjp(x, w, stride, pads, dilation))
    ref = grads(grouped)
    for a, b in zip(fast, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_results_are_bitwise_repeatable():
    """Fixed chunks and a fixed summation order: the kernel gradient must not depend on which
    thread took which rows."""
    x, w = (jnp.asarray(a) for a in _inputs((4, 33, 31, 24), 3, seed=3))
    pads = _pads(x.shape, 3, 2, 1)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.depthwise_cpu_ffi_vjp(x, w, 2, pads, 1))),
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
        return jnp.sum(jnp.sin(layers.depthwise_conv(x, w, 2, "cpu_ffi")))

    grad = jax.grad(loss, argnums=(0, 1))
    ref = jax.jit(grad)(x, w)
    sharded = jax.jit(grad, in_shardings=(NamedSharding(mesh, PartitionSpec("data")),
                                          NamedSharding(mesh, PartitionSpec())))
    for a, b in zip(sharded(x, w), ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    hlo = sharded.lower(x, w).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="effdet_depthwise' in line]
    assert len(calls) == 3
    assert all(re.search(r"= f32\[2,", line) for line in calls), calls
    assert "all-gather" not in hlo
    assert len(re.findall(r"all-reduce(?:-start)?\(", hlo)) >= 1


def test_auto_picks_the_kernel_for_float32_only():
    assert layers.resolve_depthwise_impl("auto", jnp.float32) == "cpu_ffi"
    assert layers.resolve_depthwise_impl("auto", jnp.bfloat16) == "shift_add"
    x, w = _inputs((1, 8, 8, 8), 3)
    with pytest.raises(ValueError, match="float32 only"):
        layers.depthwise_conv(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), 1, "cpu_ffi")
    with pytest.raises(ValueError, match="kernels up to 16x16"):
        layers.depthwise_conv(jnp.asarray(x), jnp.ones((17, 17, 1, 8)), 1, "cpu_ffi")


def test_without_a_compiler_auto_falls_back_and_explicit_use_says_why(tmp_path):
    """No compiler: depthwise ``auto`` and batch norm use XLA's ops; explicit ``cpu_ffi`` says why."""
    script = (
        "import jax.numpy as jnp\n"
        "from effdet_jax.kernels import depthwise_cpu\n"
        "from effdet_jax.models import layers\n"
        "print('IMPL', layers.resolve_depthwise_impl('auto'))\n"
        "try:\n"
        "    layers.depthwise_conv(jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 1, 8)), 1, 'cpu_ffi')\n"
        "except RuntimeError as error:\n"
        "    print('ERROR', error)\n"
        "from effdet_jax.models.batch_norm import batch_norm_act\n"
        "x = jnp.arange(32.0).reshape(1, 2, 2, 8)\n"
        "y, mean, var = batch_norm_act(x, jnp.ones(8), jnp.zeros(8), 1e-3, True)\n"
        "print('BN', float(mean[0]), float(var[0]))\n"
    )
    env = {**os.environ, "CXX": "/bin/false", "EFFDET_JAX_KERNEL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "IMPL shift_add" in out.stdout
    assert "ERROR depthwise_impl='cpu_ffi' is unavailable: building depthwise_cpu.cc" in out.stdout
    # Batch norm's statistics fall back to XLA's reductions: x[..., 0] is 0, 8, 16, 24.
    assert "BN 12.0 80.0" in out.stdout
    assert not list(tmp_path.glob("*.so"))
