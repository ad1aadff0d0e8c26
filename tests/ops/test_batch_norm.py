"""Train-mode batch norm + swish as one op (``effdet_jax.ops.batch_norm``) against flax's BN +
swish: values and gradients, with the CPU kernels (checked in the HLO), on one device and on a
sharded batch.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax.ops.batch_norm import train_batch_norm
from effdet_jax.ops.policy import cpu_kernels

EPS = 1e-3


def _fused_loss(x, scale, bias, t, swish=True):
    y, mean, var = train_batch_norm(x, scale, bias, EPS, swish)
    return jnp.sum(y * t) + jnp.sum(mean * 3.0) - jnp.sum(var * 5.0)


def _flax_loss(x, scale, bias, t, swish=True):
    ref = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=EPS)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
    y, state = ref.apply(variables, x, mutable=["batch_stats"])
    y = jax.nn.swish(y) if swish else y
    # momentum 0: the new running statistics are the batch's mean and var.
    bs = state["batch_stats"]
    return jnp.sum(y * t) + jnp.sum(bs["mean"] * 3.0) - jnp.sum(bs["var"] * 5.0)


@pytest.mark.usefixtures("cpu_depthwise_kernel")
@pytest.mark.parametrize("swish", [True, False])
def test_cpu_kernel_runs_and_matches_flax_over_the_whole_swish_range(swish):
    """On CPU float32 ``[N, H, W, C]`` the statistics and the backward pass go through the FFI
    kernels (the custom calls are in the HLO); pre-activations run from -120 to 120."""
    rng = np.random.default_rng(6)
    shape = (3, 6, 5, 21)
    x = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.2, 4.0, 21) - 1.0, jnp.float32)
    scale = jnp.asarray(np.linspace(-40.0, 40.0, 21), jnp.float32)
    bias = jnp.asarray(rng.uniform(-5.0, 5.0, 21), jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    with cpu_kernels("require"):
        grad = jax.jit(jax.value_and_grad(_fused_loss, argnums=(0, 1, 2)), static_argnums=4)
        hlo = grad.lower(x, scale, bias, t, swish).compile().as_text()
    for target in ("effdet_channel_sums", "effdet_bn_backward_sums", "effdet_bn_backward_input"):
        assert f'custom_call_target="{target}"' in hlo
    # Without swish XLA applies the affine map itself (fused into the consumer).
    assert ('custom_call_target="effdet_bn_swish"' in hlo) == swish
    value, grads = grad(x, scale, bias, t, swish)
    ref_value, ref_grads = jax.jit(
        jax.value_and_grad(_flax_loss, argnums=(0, 1, 2)), static_argnums=4
    )(x, scale, bias, t, swish)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.usefixtures("cpu_depthwise_kernel")
def test_cpu_kernel_on_a_sharded_batch_matches_one_device():
    """Batch over ``data`` of a 4x2 mesh: the statistics stay the global batch's, values and
    gradients equal one device, the kernels run on each device's quarter of the batch and nothing
    is gathered."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(7)
    shape = (8, 6, 6, 16)
    # Per-image offsets: a per-device statistic would differ from the global one.
    x = jnp.asarray(rng.standard_normal(shape) + np.arange(8)[:, None, None, None], jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    grad = jax.value_and_grad(_fused_loss, argnums=(0, 1, 2))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with cpu_kernels("require"):
        ref = jax.jit(grad)(x, scale, bias, t)
        sharded = jax.jit(grad, in_shardings=(data, replicated, replicated, data))
        out = sharded(x, scale, bias, t)
        hlo = sharded.lower(x, scale, bias, t).compile().as_text()
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    calls = {re.search(r'custom_call_target="(\w+)"', line).group(1): line
             for line in hlo.splitlines() if 'custom_call_target="effdet_' in line}
    # Each device's quarter of the batch: per-image sums [2, 2, C], the input gradient [2, H, W, C].
    assert set(calls) == {"effdet_channel_sums", "effdet_bn_swish", "effdet_bn_backward_sums",
                          "effdet_bn_backward_input"}
    assert re.search(r"= f32\[2,2,16\]", calls["effdet_channel_sums"])
    assert re.search(r"= f32\[2,2,16\]", calls["effdet_bn_backward_sums"])
    assert re.search(r"= f32\[2,6,6,16\]", calls["effdet_bn_swish"])
    assert re.search(r"= f32\[2,6,6,16\]", calls["effdet_bn_backward_input"])
    assert "all-gather" not in hlo
