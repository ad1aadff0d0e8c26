"""The CPU-kernel switch (``effdet_jax.ops.policy``): its modes, the process default, the model
config field, and what each mode puts in a D0-tiny train step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax import efficientdet
from effdet_jax.models.model_config import get_efficientdet_config
from effdet_jax.ops import policy
from effdet_jax.ops.batch_norm import train_batch_norm
from effdet_jax.ops.depthwise import depthwise_conv


def test_modes_resolve():
    assert policy.resolve("off", unavailable_reason="") == policy.CpuKernels("off", ffi=False)
    assert policy.resolve("auto", unavailable_reason="") == policy.CpuKernels("auto", ffi=True)
    assert policy.resolve("require", unavailable_reason="") == policy.CpuKernels("require", ffi=True)
    # Where the kernels cannot be built, auto uses XLA's ops and require says why.
    assert policy.resolve("auto", unavailable_reason="no C++ compiler found") == policy.CpuKernels(
        "auto", ffi=False)
    with pytest.raises(RuntimeError, match="cpu_kernels='require'.*no C\\+\\+ compiler found"):
        policy.resolve("require", unavailable_reason="no C++ compiler found")
    with pytest.raises(ValueError, match="cpu_kernels='lax' is not allowed"):
        policy.resolve("lax")
    assert not policy.CpuKernels("off", False).cpu_paths
    assert policy.CpuKernels("auto", False).cpu_paths


def test_process_default(monkeypatch):
    monkeypatch.delenv(policy.ENV_VARIABLE, raising=False)
    monkeypatch.delenv(policy.REQUIRE_VARIABLE, raising=False)
    assert policy.default_mode() == "auto"
    monkeypatch.setenv(policy.REQUIRE_VARIABLE, "1")
    assert policy.default_mode() == "require"
    monkeypatch.setenv(policy.ENV_VARIABLE, "off")
    assert policy.default_mode() == "off"
    assert policy.current() == policy.CpuKernels("off", False)
    monkeypatch.setenv(policy.ENV_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        policy.default_mode()


def test_context_nests_and_none_keeps_the_enclosing_policy():
    with policy.cpu_kernels("off"):
        with policy.cpu_kernels(None) as inner:
            assert inner.mode == "off"
            assert policy.current().mode == "off"
        with policy.cpu_kernels(policy.CpuKernels("auto", False)):
            assert policy.current() == policy.CpuKernels("auto", False)
        assert policy.current().mode == "off"


def test_auto_without_the_kernels_uses_xla_on_cpu():
    """``auto`` where the kernels cannot be built: shift-and-add and the fused batch norm in XLA,
    no FFI call, the same values."""
    x = jnp.arange(32.0).reshape(1, 2, 2, 8)
    w = jnp.ones((3, 3, 1, 8))
    with policy.cpu_kernels(policy.resolve("auto", unavailable_reason="no C++ compiler found")):
        y, mean, var = jax.jit(lambda x: train_batch_norm(x, jnp.ones(8), jnp.zeros(8), 1e-3, True))(x)
        dw = jax.jit(lambda x, w: depthwise_conv(x, w, 1))
        hlo = dw.lower(x, w).compile().as_text()
        out = dw(x, w)
    # x[..., 0] is 0, 8, 16, 24.
    assert float(mean[0]) == 12.0 and float(var[0]) == 80.0
    assert "effdet_" not in hlo.replace("effdet_jax", "")
    np.testing.assert_allclose(np.asarray(out), np.asarray(depthwise_conv(x, w, 1, impl="lax")), rtol=1e-6)


def test_model_config_field():
    assert get_efficientdet_config("efficientdet-d0", cpu_kernels="off").cpu_kernels == "off"
    assert get_efficientdet_config("efficientdet-d0").cpu_kernels is None
    with pytest.raises(ValueError, match="cpu_kernels='fast' is not allowed"):
        get_efficientdet_config("efficientdet-d0", cpu_kernels="fast")
    with pytest.raises(ValueError, match="depthwise_impl .*cpu_kernels"):
        get_efficientdet_config("efficientdet-d0", depthwise_impl="lax")


def _train_step_hlo(mode: str) -> str:
    model = efficientdet(
        "efficientdet-d0", num_classes=3, image_size=64, fpn_num_filters=16, fpn_cell_repeats=1,
        box_class_repeats=1, cpu_kernels=mode,
        backbone_overrides=(("width_coefficient", 0.25), ("depth_coefficient", 0.25)),
    )
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def loss(params, batch_stats):
        (cls, box), _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
        return sum(jnp.sum(o**2) for o in cls + box)

    step = jax.jit(jax.value_and_grad(loss))
    return step.lower(variables["params"], variables["batch_stats"]).as_text()


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_train_step_calls_the_kernels_unless_off(mode):
    """``off``: no ``effdet_`` FFI call in a D0-tiny train step; ``auto`` on CPU with the kernels
    built: the depthwise and batch-norm kernels, forward and backward."""
    calls = set(re.findall(r"custom_call @(effdet_\w+)", _train_step_hlo(mode)))
    if mode == "off":
        assert not calls
        return
    if jax.default_backend() != "cpu" or not policy.resolve("auto").ffi:
        pytest.skip("the kernels are on CPU only, where they build")
    assert calls == {
        "effdet_depthwise_forward", "effdet_depthwise_input_grad", "effdet_depthwise_kernel_grad",
        "effdet_channel_sums", "effdet_bn_swish", "effdet_bn_backward_sums", "effdet_bn_backward_input",
    }


def test_one_traced_function_lowers_for_cpu_and_gpu():
    """The platform choice is inside the traced function: exported for CPU and CUDA together, the
    gradient of depthwise + batch norm holds both the FFI calls (CPU branch) and XLA's
    convolution (the other branch), selected by a ``case`` on the platform."""
    from jax import export

    def f(x, w):
        y, _, _ = train_batch_norm(depthwise_conv(x, w, 2), jnp.ones(8), jnp.zeros(8), 1e-3, True)
        return jnp.sum(y**2)

    x, w = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 1, 8))
    targets = ["effdet_depthwise_forward", "effdet_depthwise_input_grad",
               "effdet_depthwise_kernel_grad", "effdet_channel_sums", "effdet_bn_swish",
               "effdet_bn_backward_sums", "effdet_bn_backward_input"]
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    with policy.cpu_kernels(policy.CpuKernels("auto", ffi=True)):
        exported = export.export(jax.jit(jax.grad(f, argnums=(0, 1))), platforms=("cpu", "cuda"),
                                 disabled_checks=checks)(x, w)
    text = exported.mlir_module()
    assert set(re.findall(r"custom_call @(effdet_\w+)", text)) == set(targets)
    assert "stablehlo.case" in text and "stablehlo.convolution" in text
