"""``config.xla_cpu_opt_preset``: the XLA:CPU preset the train step compiles with."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effdet_jax.train.compile_options import CPU_OPT_PRESETS, train_step_compiler_options


def _conv_bn_grad(x, w):
    """A small stand-in for a train step: conv, batch statistics, swish, a loss and its grad."""
    def loss(w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = (y - y.mean((0, 1, 2))) * jax.lax.rsqrt(y.var((0, 1, 2)) + 1e-3)
        return jnp.mean(jax.nn.log_sigmoid(jax.nn.swish(y)) ** 2)
    return jax.value_and_grad(loss)(w)


@pytest.mark.parametrize("preset", list(CPU_OPT_PRESETS))
def test_every_preset_compiles_on_this_xla_and_keeps_the_numbers(preset):
    """Each value maps to an enum this XLA:CPU accepts (a misspelt name fails to compile), and the
    preset changes the compile, not the result: equal to the default preset's to float32
    rounding."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 8)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 8, 16)) * 0.1, jnp.float32)
    options = train_step_compiler_options(preset, jax.devices("cpu"))
    assert options == {"xla_cpu_opt_preset": CPU_OPT_PRESETS[preset]}
    loss, grad = jax.jit(_conv_bn_grad, compiler_options=options)(x, w)
    ref_options = train_step_compiler_options("default", jax.devices("cpu"))
    ref_loss, ref_grad = jax.jit(_conv_bn_grad, compiler_options=ref_options)(x, w)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_other_backends_get_no_option():
    gpu = types.SimpleNamespace(platform="gpu")
    assert train_step_compiler_options("fast_compile", [gpu]) is None


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="fast_compile"):
        train_step_compiler_options("O0", jax.devices("cpu"))
