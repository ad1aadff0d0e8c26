"""``models.batch_norm.BatchNorm`` against flax's ``nn.BatchNorm`` followed by the activation.

flax is the independent reference: same variables, the same outputs and running statistics, and
gradients (of the input, scale and bias) equal to autodiff of flax's BN + activation up to float32
summation order, in train and eval mode, for swish (fused), no activation and relu6 (applied
after).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax.models.batch_norm import BatchNorm
from effdet_jax.ops.batch_norm import batch_norm_act
from effdet_jax.ops.policy import CpuKernels, cpu_kernels, current

EPS, MOMENTUM = 1e-3, 0.99


def _modules(activation):
    ours = BatchNorm(momentum=MOMENTUM, epsilon=EPS, activation=activation)
    ref = nn.BatchNorm(use_running_average=False, momentum=MOMENTUM, epsilon=EPS)
    act = activation or (lambda y: y)
    return ours, lambda v, x: _apply_ref(ref, act, v, x)


def _apply_ref(ref, act, variables, x):
    y, state = ref.apply(variables, x, mutable=["batch_stats"])
    return act(y), state


def _variables(channels, rng):
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(channels), jnp.float32),
    }
    stats = {
        "mean": jnp.asarray(rng.standard_normal(channels), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32),
    }
    return {"params": params, "batch_stats": stats}


# The CPU-kernel policies: kernels where they build, the fused op in XLA (``auto`` where the
# kernels cannot be built), and XLA's plain ops (autodiff; what GPU / TPU run).
POLICIES = {"auto": "auto", "auto_xla": CpuKernels("auto", ffi=False), "off": "off"}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("activation", [jax.nn.swish, None, jax.nn.relu6], ids=["swish", "none", "relu6"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (3, 1, 1, 5), (40, 9)])
def test_train_mode_matches_flax(activation, shape, policy):
    """Every train-mode path: the custom VJP (CPU; with and without the FFI kernels) and autodiff
    (GPU / TPU, and everywhere with ``off``)."""
    with cpu_kernels(POLICIES[policy]) as resolved:
        _check_train_mode(activation, shape, resolved.cpu_paths)


def _check_train_mode(activation, shape, fused):
    rng = np.random.default_rng(len(shape) * 7 + shape[-1])
    # An offset mean and a spread of scales, as real pre-BN activations have.
    x = jnp.asarray(rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[-1]) + 2.0, jnp.float32)
    ours, ref = _modules(activation)
    variables = _variables(shape[-1], rng)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    )

    y, state = ours.apply(variables, x, mutable=["batch_stats"])
    y_ref, state_ref = ref(variables, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            state["batch_stats"][k], state_ref["batch_stats"][k], rtol=1e-5, atol=1e-6
        )

    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def grads(apply):
        def loss(params, x):
            out, new_state = apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
            # The running statistics are differentiable outputs too: weight them in.
            bs = new_state["batch_stats"]
            return jnp.sum(out * t) + jnp.sum(bs["mean"] * 3.0) - jnp.sum(bs["var"] * 5.0)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)

    ours_apply = lambda v, x: ours.apply(v, x, mutable=["batch_stats"])  # noqa: E731
    jaxpr = str(jax.make_jaxpr(ours_apply)(variables, x))
    assert ("custom_vjp_call" in jaxpr) == fused
    g = grads(ours_apply)
    g_ref = grads(ref)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("activation", [jax.nn.swish, None], ids=["swish", "none"])
@pytest.mark.parametrize("channels", [6, 27])
def test_eval_mode_matches_flax(activation, channels):
    """Values and gradients (frozen-BN fine-tuning differentiates eval mode) against flax's BN +
    activation. On CPU, eval-mode BN + swish is the ``effdet_bn_swish`` kernel (checked in the
    HLO) with an XLA backward pass."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, channels)) * 2.0, jnp.float32)
    variables = _variables(channels, rng)
    ours = BatchNorm(use_running_average=True, epsilon=EPS, activation=activation)
    ref = nn.BatchNorm(use_running_average=True, epsilon=EPS)
    act = activation or (lambda y: y)
    t = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def loss(module_apply):
        return lambda params, x: jnp.sum(
            module_apply({"params": params, "batch_stats": variables["batch_stats"]}, x) * t)

    ours_loss = loss(ours.apply)
    ref_loss = loss(lambda v, x: act(ref.apply(v, x)))
    y = jax.jit(ours.apply)(variables, x)
    np.testing.assert_allclose(y, act(ref.apply(variables, x)), rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(ours_loss, argnums=(0, 1)))(variables["params"], x)
    ref_grads = jax.grad(ref_loss, argnums=(0, 1))(variables["params"], x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(ours.apply).lower(variables, x).compile().as_text()
    kernel = jax.default_backend() == "cpu" and current().ffi
    assert ('custom_call_target="effdet_bn_swish"' in hlo) == (kernel and activation is not None)


def test_bfloat16_output_and_float32_statistics():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 6, 6, 8)) + 1.0, jnp.bfloat16)
    variables = _variables(8, rng)
    y, state = BatchNorm(epsilon=EPS, dtype=jnp.bfloat16, activation=jax.nn.swish).apply(
        variables, x, mutable=["batch_stats"]
    )
    assert y.dtype == jnp.bfloat16
    assert state["batch_stats"]["mean"].dtype == jnp.float32
    xf = x.astype(jnp.float32)
    np.testing.assert_allclose(
        state["batch_stats"]["mean"],
        MOMENTUM * variables["batch_stats"]["mean"] + (1 - MOMENTUM) * xf.mean((0, 1, 2)),
        rtol=1e-5, atol=1e-6,
    )
    gx = jax.grad(lambda x: jnp.sum(batch_norm_act(x, jnp.ones(8), jnp.zeros(8), EPS, True)[0]))(x)
    assert gx.dtype == jnp.bfloat16


def test_shard_map_axis_name_averages_statistics_over_devices():
    """With ``axis_name`` the statistics (and so the outputs and gradients) are those of the whole
    batch, as flax's BN with the same ``axis_name`` computes them."""
    devices = np.array(jax.devices()[:2])
    if devices.size < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = jax.sharding.Mesh(devices, ("data",))
    spec = jax.sharding.PartitionSpec("data")
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 3, 3, 6)) * 2.0 + 1.0, jnp.float32)
    variables = _variables(6, rng)

    def sharded(module, act):
        def fn(x):
            y, state = module.apply(variables, x, mutable=["batch_stats"])
            return act(y), state["batch_stats"]["mean"]

        out_specs = (spec, jax.sharding.PartitionSpec())
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=out_specs))

    y, mean = sharded(BatchNorm(epsilon=EPS, axis_name="data", activation=jax.nn.swish), jnp.asarray)(x)
    ref = nn.BatchNorm(use_running_average=False, epsilon=EPS, momentum=MOMENTUM, axis_name="data")
    y_ref, mean_ref = sharded(ref, jax.nn.swish)(x)
    y_global, state_global = BatchNorm(epsilon=EPS, activation=jax.nn.swish).apply(
        variables, x, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, y_global, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, state_global["batch_stats"]["mean"], rtol=1e-5, atol=1e-6)
