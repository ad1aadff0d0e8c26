"""``models.batch_norm.BatchNorm`` against flax's ``nn.BatchNorm`` followed by the activation.

flax is the independent reference: same variables, the same outputs and running statistics, and
gradients (of the input, scale and bias) equal to autodiff of flax's BN + activation up to float32
summation order, in train and eval mode, for swish (fused), no activation and relu6 (applied
after).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax.models import batch_norm
from effdet_jax.models.batch_norm import BatchNorm, batch_norm_act

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


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "autodiff"])
@pytest.mark.parametrize("activation", [jax.nn.swish, None, jax.nn.relu6], ids=["swish", "none", "relu6"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 12), (3, 1, 1, 5), (40, 9)])
def test_train_mode_matches_flax(activation, shape, fused, monkeypatch):
    """Both train-mode paths: the custom VJP (CPU) and autodiff (GPU / TPU)."""
    monkeypatch.setattr(batch_norm, "use_fused_backward", lambda: fused)
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
    kernel = jax.default_backend() == "cpu" and batch_norm.batch_norm_cpu.available()
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


def _fused_loss(x, scale, bias, t, swish=True):
    y, mean, var = batch_norm_act(x, scale, bias, EPS, swish)
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
    ref = jax.jit(grad)(x, scale, bias, t)
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.jit(grad, in_shardings=(data, replicated, replicated, data))
    out = sharded(x, scale, bias, t)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    hlo = sharded.lower(x, scale, bias, t).compile().as_text()
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


@pytest.mark.usefixtures("cpu_depthwise_kernel")
@pytest.mark.parametrize("shape", [(2, 9, 7, 19), (3, 1, 1, 8), (1, 40, 3, 3), (2, 5, 6, 27)])
def test_cpu_sums_match_float64(shape):
    """The FFI sums against float64 numpy, to float32 accuracy relative to the sum of the terms'
    magnitudes (channel counts below, at and above the 8-lane vector; 1 to 40 rows)."""
    from effdet_jax.kernels import batch_norm_cpu

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
    from effdet_jax.kernels import batch_norm_cpu

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
