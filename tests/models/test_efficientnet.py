"""EfficientNet: parameter counts (published), timm parity, drop-connect, initialisers, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_torch_reference

from effdet_jax import efficientnet
from effdet_jax.convert import CheckpointMismatchError, load_timm_efficientnet
from effdet_jax.models.efficientnet import count_params, drop_connect
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS, get_efficientnet_config

# Official parameter counts (1000 classes), as published with the TF release and by timm.
PUBLISHED_PARAMS = {
    "efficientnet-b0": 5_288_548,
    "efficientnet-b1": 7_794_184,
    "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232,
    "efficientnet-b4": 19_341_616,
    "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704,
    "efficientnet-b7": 66_347_960,
}


def _shapes(model, size=32):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_official(name):
    assert count_params(_shapes(efficientnet(name))) == PUBLISHED_PARAMS[name]


def test_feature_extractor_parameter_count_and_endpoints():
    model = efficientnet("efficientnet-b0", features_only=True)
    assert count_params(_shapes(model)) == 3_595_388
    out = jax.eval_shape(
        lambda: model.apply(_init(model, 224), jnp.zeros((1, 224, 224, 3)))
    )
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes == {
        2: (1, 112, 112, 16),
        4: (1, 56, 56, 24),
        8: (1, 28, 28, 40),
        16: (1, 14, 14, 112),
        32: (1, 7, 7, 320),
    }


def _init(model, size):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_se_reduces_from_block_input_filters():
    # Block 1 of B0 expands 16 -> 96 channels; SE reduces to int(16 * 0.25) = 4, not 96 * 0.25.
    shapes = _shapes(efficientnet("efficientnet-b0"))
    se = shapes["params"]["block_1"]["se"]
    assert se["se_reduce"]["kernel"].shape == (1, 1, 96, 4)
    assert se["se_expand"]["kernel"].shape == (1, 1, 4, 96)


def test_lite_has_no_se_and_fixed_stem_head():
    cfg = get_efficientnet_config("efficientnet-lite4")
    assert cfg.activation == "relu6" and not cfg.use_se
    shapes = _shapes(efficientnet("efficientnet-lite4"))
    assert shapes["params"]["stem_conv"]["kernel"].shape[-1] == 32
    assert shapes["params"]["head_conv"]["kernel"].shape[-1] == 1280
    assert all("se" not in v for k, v in shapes["params"].items() if k.startswith("block_"))


def _timm_case(ref, timm_name):
    prefix = f"{timm_name}/sd/"
    sd = {k[len(prefix):]: ref[k] for k in ref if k.startswith(prefix)}
    return sd, ref[f"{timm_name}/input"], ref[f"{timm_name}/logits"]


@pytest.mark.torch_ref
@pytest.mark.parametrize(
    "timm_name", ["tf_efficientnet_b0", "tf_efficientnet_b2", "tf_efficientnet_lite0"]
)
def test_logits_match_timm(timm_name):
    ref = load_torch_reference("timm_efficientnet")
    sd, x, expected = _timm_case(ref, timm_name)
    variables = load_timm_efficientnet(sd, timm_name)
    model = efficientnet(timm_name.replace("tf_efficientnet_", "efficientnet-"))
    for impl in ("auto", "off"):
        out = jax.jit(model.clone(cpu_kernels=impl).apply)(variables, x)
        err = np.abs(np.asarray(out) - expected).max()
        assert err <= 1e-4 * np.abs(expected).max(), (impl, err)


@pytest.mark.torch_ref
def test_timm_converter_names_mismatches():
    ref = load_torch_reference("timm_efficientnet")
    sd, _, _ = _timm_case(ref, "tf_efficientnet_b0")
    sd = dict(sd)
    sd.pop("blocks.3.1.conv_dw.weight")
    sd["blocks.9.0.extra.weight"] = np.zeros(3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_timm_efficientnet(sd, "efficientnet-b0")
    assert "block_6/depthwise_conv/kernel" in str(err.value)
    assert "blocks.9.0.extra.weight" in str(err.value)


@pytest.mark.parametrize("variant", ["sample", "channel", "element"])
def test_drop_connect_noise_shape_and_expectation(variant):
    rate = 0.3
    x = jnp.ones((4096, 2, 3, 5))
    y = np.asarray(drop_connect(x, rate, variant, jax.random.key(1)))
    kept = y != 0
    # Every kept entry is rescaled by 1/(1-rate).
    np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)
    if variant == "sample":
        assert (kept == kept[:, :1, :1, :1]).all()
    elif variant == "channel":
        assert (kept == kept[:, :1, :1, :]).all() and not (kept == kept[..., :1]).all()
    else:
        assert not (kept == kept[:, :1, :1, :1]).all()
    # Expectation preserved: mean over 4096 samples within 4 standard errors.
    n = 4096 if variant == "sample" else y.size
    se = np.sqrt(rate / (1 - rate) / n)
    assert abs(y.mean() - 1.0) < 4 * se


def test_drop_connect_weight_variant_keeps_expectation():
    from effdet_jax.models.layers import drop_weights

    k = jnp.ones((1, 1, 64, 64))
    samples = jnp.stack([drop_weights(k, 0.25, jax.random.key(i)) for i in range(64)])
    np.testing.assert_allclose(np.unique(np.asarray(samples)), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(float(samples.mean()) - 1.0) < 4 * np.sqrt(0.25 / 0.75 / samples.size)


@pytest.mark.parametrize("variant", DROP_CONNECT_VARIANTS)
def test_training_step_with_each_drop_connect_variant(variant):
    model = efficientnet(
        "efficientnet-b0", num_classes=4, drop_connect_rate=0.5, drop_connect_variant=variant,
        dropout_rate=0.0,
    )
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.key(1), x)

    @jax.jit
    def loss(params, key):
        out, upd = model.apply(
            {"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": key},
        )
        return jnp.sum(out**2), upd

    (l1, upd), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"], jax.random.key(2))
    l2, _ = loss(v["params"], jax.random.key(3))
    assert np.isfinite(l1) and all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    assert set(upd) == {"batch_stats"}
    # With classifier dropout off, the rng only matters through drop-connect.
    assert (l1 == l2) == (variant == "none")
    # eval mode is deterministic and uses no rng
    e1 = jax.jit(model.apply)(v, x)
    e2 = jax.jit(model.apply)(v, x)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))


def test_initialiser_statistics():
    model = efficientnet("efficientnet-b0")
    params = _init(model, 32)["params"]
    # conv: N(0, 2 / (kh*kw*out)).
    k = np.asarray(params["block_15"]["expand_conv"]["kernel"])  # [1,1,192,1152]
    np.testing.assert_allclose(k.std(), np.sqrt(2.0 / 1152), rtol=0.02)
    assert abs(k.mean()) < 3 * np.sqrt(2.0 / 1152) / np.sqrt(k.size)
    # depthwise: fan_out = kh*kw*multiplier = 25.
    d = np.asarray(params["block_15"]["depthwise_conv"]["kernel"])  # [3,3,1,1152]
    np.testing.assert_allclose(d.std(), np.sqrt(2.0 / 9), rtol=0.05)
    # dense: U(+-1/sqrt(units)).
    w = np.asarray(params["classifier"]["kernel"])
    limit = 1 / np.sqrt(1000)
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
    np.testing.assert_allclose(w.std(), limit / np.sqrt(3), rtol=0.02)
    assert np.all(np.asarray(params["classifier"]["bias"]) == 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_mixed_precision_keeps_float32_params_and_stats(dtype):
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    ref_model = efficientnet("efficientnet-b0", num_classes=10)
    model = efficientnet("efficientnet-b0", num_classes=10, dtype=dtype)
    v = jax.jit(model.init)(jax.random.key(1), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v))
    out, upd = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )
    )(v, x)
    assert out.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd))
    low, full = jax.jit(model.apply)(v, x), jax.jit(ref_model.apply)(v, x)
    tol = 0.1 * float(jnp.abs(full).max()) + 0.05
    np.testing.assert_allclose(np.asarray(low), np.asarray(full), atol=tol)


def test_bad_override_is_named():
    with pytest.raises(ValueError, match="drop_conect_rate"):
        efficientnet("efficientnet-b0", drop_conect_rate=0.1)
    with pytest.raises(ValueError, match="drop_connect_variant"):
        efficientnet("efficientnet-b0", drop_connect_variant="block")
    with pytest.raises(ValueError, match="known"):
        efficientnet("efficientnet-b9")
