"""The batch-norm FFI kernels (``effdet_jax.kernels.batch_norm_cpu``) against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax.kernels import batch_norm_cpu


@pytest.mark.usefixtures("cpu_depthwise_kernel")
@pytest.mark.parametrize("shape", [(2, 9, 7, 19), (3, 1, 1, 8), (1, 40, 3, 3), (2, 5, 6, 27)])
def test_cpu_sums_match_float64(shape):
    """The FFI sums against float64 numpy, to float32 accuracy relative to the sum of the terms'
    magnitudes (channel counts below, at and above the 8-lane vector; 1 to 40 rows)."""
    x = np.random.default_rng(8).standard_normal(shape).astype(np.float32) * 3.0 + 0.5
    sums = jax.jit(batch_norm_cpu.channel_sums)(jnp.asarray(x))
    x64 = x.astype(np.float64)
    for got, terms in zip(sums, (x64, x64 * x64), strict=True):
        error = np.abs(np.asarray(got, np.float64) - terms.sum((0, 1, 2)))
        assert np.all(error <= 1e-6 * np.abs(terms).sum((0, 1, 2))), error


@pytest.mark.usefixtures("cpu_depthwise_kernel")
@pytest.mark.parametrize("channels", [11, 19, 27])
@pytest.mark.parametrize("swish", [True, False])
def test_cpu_backward_kernels_match_float64(swish, channels):
    """The backward kernels' sums and input gradient, and the forward swish, against float64
    numpy (``exp`` exact), for pre-activations z from -100 to 100 and channel counts that take
    every path of the kernels (16-lane vectors, 8-lane vectors, scalar remainder: 11 = 8 + 3,
    19 = 16 + 3, 27 = 16 + 8 + 3): the sums to float32 accuracy relative to the sum of the terms'
    magnitudes, the gradient and the swish elementwise."""
    rng = np.random.default_rng(9)
    shape = (2, 7, 5, channels)
    x = rng.standard_normal(shape).astype(np.float32) * 2.0 + 0.3
    gy = rng.standard_normal(shape).astype(np.float32)
    a = np.linspace(-30.0, 30.0, channels).astype(np.float32)
    mean, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    c1, c0 = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    sums = jax.jit(batch_norm_cpu.backward_sums, static_argnums=5)(
        *map(jnp.asarray, (x, gy, a, mean, bias)), swish)
    gx = jax.jit(batch_norm_cpu.backward_input, static_argnums=7)(
        *map(jnp.asarray, (x, gy, a, mean, bias, c1, c0)), swish)

    x64, gy64 = x.astype(np.float64), gy.astype(np.float64)
    centred = x64 - mean
    z = centred * a + bias
    assert z.min() < -80 and z.max() > 80
    sig = 1.0 / (1.0 + np.exp(-z))
    gz = gy64 * sig * (1.0 + z * (1.0 - sig)) if swish else gy64
    for got, terms in zip(sums, (gz, gz * centred), strict=True):
        error = np.abs(np.asarray(got, np.float64) - terms.sum((0, 1, 2)))
        assert np.all(error <= 2e-6 * np.abs(terms).sum((0, 1, 2)) + 1e-30), error
    want = a * gz + c1 * centred + c0
    scale = np.abs(a * gz) + np.abs(c1 * centred) + np.abs(c0)
    assert np.all(np.abs(np.asarray(gx, np.float64) - want) <= 2e-6 * scale + 1e-30)
    if swish:
        y = jax.jit(batch_norm_cpu.swish_apply)(*map(jnp.asarray, (x, a, mean, bias)))
        want = z * sig
        assert np.all(np.abs(np.asarray(y, np.float64) - want) <= 1e-6 * np.abs(z) + 1e-30)
