"""EfficientDet: published parameter counts and FLOPs, exact parity with automl (TF1/TF2 checkpoints,
fastattn / channel_attn / sum fusion, lite0) and effdet (PyTorch), fusion methods and head options."""

import pathlib
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from automl_reference import ReferenceOutputs
from conftest import load_torch_reference

from effdet_jax import efficientdet
from effdet_jax.convert import (
    CheckpointMismatchError,
    convert_automl_arrays,
    load_automl_checkpoint,
    load_effdet_state_dict,
)
from effdet_jax.models.bifpn import FUSION_METHODS, bifpn_nodes, fuse
from effdet_jax.models.efficientnet import count_params
from effdet_jax.models.finetune import trainable_mask, transfer_variables
from effdet_jax.models.model_config import get_efficientdet_config
from effdet_jax.summary import summarize

# automl's trainable parameter counts (90 classes, with the redundant conv biases automl keeps);
# D7x from effdet's tf_efficientdet_d7x (automl publishes 77.0M).
PUBLISHED_PARAMS = {
    "efficientdet-d0": 3_880_067,
    "efficientdet-d1": 6_625_898,
    "efficientdet-d2": 8_097_039,
    "efficientdet-d3": 12_032_296,
    "efficientdet-d4": 20_723_675,
    "efficientdet-d5": 33_653_315,
    "efficientdet-d6": 51_871_782,
    "efficientdet-d7": 51_871_782,
    "efficientdet-d7x": 77_147_166,
    "efficientdet-lite0": 3_243_470,
    "efficientdet-lite1": 4_248_318,
    "efficientdet-lite2": 5_252_334,
    "efficientdet-lite3": 8_350_862,
    "efficientdet-lite3x": 9_280_862,
    "efficientdet-lite4": 15_130_894,
}
# automl's reported FLOPs (multiply-adds + element-wise work, tfprof // 2).
PUBLISHED_FLOPS = {
    "efficientdet-d0": 2_550_618_821,
    "efficientdet-d1": 6_133_752_112,
    "efficientdet-d3": 24_982_737_931,
}
LEVELS = range(3, 8)


def _shapes(model):
    x = jnp.zeros((1, *model.config.image_size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_automl(name):
    assert count_params(_shapes(efficientdet(name))) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_FLOPS))
def test_flops_within_one_percent_of_automl(name):
    summary = summarize(efficientdet(name))
    assert abs(summary.automl_flops / PUBLISHED_FLOPS[name] - 1) < 0.01
    assert summary.params == PUBLISHED_PARAMS[name]
    assert set(summary.macs_by_part) == {"backbone", "fpn", "class_net", "box_net"}
    assert sum(summary.macs_by_part.values()) == summary.macs


def test_output_shapes_d7x_has_p8():
    model = efficientdet("efficientdet-d7x")
    x = jnp.zeros((1, *model.config.image_size, 3))
    cls, box = jax.eval_shape(lambda v: model.apply(v, x), _shapes(model))
    assert [c.shape for c in cls] == [(1, s, s, 9 * 90) for s in (192, 96, 48, 24, 12, 6)]
    assert [b.shape for b in box] == [(1, s, s, 36) for s in (192, 96, 48, 24, 12, 6)]


def test_bifpn_graph_is_automl_node_list():
    # From the automl reference README: node k -> (level, input ids).
    expected = [(6, (3, 4)), (5, (2, 5)), (4, (1, 6)), (3, (0, 7)), (4, (1, 7, 8)),
                (5, (2, 6, 9)), (6, (3, 5, 10)), (7, (4, 11))]
    assert bifpn_nodes(3, 7) == expected


def test_fastattn_on_unit_weights():
    x = jnp.array([1.0, 3.0])
    out = fuse([x, x], jnp.ones(2), "fastattn")
    np.testing.assert_allclose(np.asarray(out), [0.99995, 2.99985], rtol=1e-6)


def test_fusion_methods_definitions():
    a, b = jnp.full((3,), 2.0), jnp.full((3,), 5.0)
    w = jnp.array([0.3, -0.7])
    np.testing.assert_allclose(fuse([a, b], None, "sum"), 7.0)
    s = np.exp([0.3, -0.7]) / np.exp([0.3, -0.7]).sum()
    np.testing.assert_allclose(fuse([a, b], w, "attn"), 2 * s[0] + 5 * s[1], rtol=1e-6)
    # relu(-0.7) = 0: the second input is switched off.
    np.testing.assert_allclose(fuse([a, b], w, "fastattn"), 2 * 0.3 / (0.3 + 1e-4), rtol=1e-6)
    wc = jnp.array([[0.3, 1.0, 0.0], [-0.7, 1.0, 2.0]])
    out = np.asarray(fuse([a, b], wc, "channel_attn"))
    np.testing.assert_allclose(out[1], 3.5, rtol=1e-6)
    out = np.asarray(fuse([a, b], wc, "channel_fastattn"))
    np.testing.assert_allclose(out[2], 5 * 2 / (2 + 1e-4), rtol=1e-6)


@pytest.fixture(scope="module")
def automl(automl_reference):
    return automl_reference, automl_reference.input("d0")


def _assert_outputs_match(cls, box, ref: ReferenceOutputs, levels_cls=LEVELS, levels_box=LEVELS):
    """Every reference output ``cls_L`` (L in levels_cls) and ``box_L`` (L in levels_box) matches
    ours to 1e-4 of the reference's max |value|; the reference holds exactly those keys. Sampled
    references compare our outputs at their stored positions."""
    expected_keys = {f"cls_{lvl}" for lvl in levels_cls} | {f"box_{lvl}" for lvl in levels_box}
    assert ref.keys() == expected_keys
    for i, lvl in enumerate(LEVELS):
        for name, out in (("cls", cls), ("box", box)):
            key = f"{name}_{lvl}"
            if key not in expected_keys:
                continue
            expected = ref.arrays[key]
            err = np.abs(ref.select(key, out[i]) - expected).max()
            assert err <= 1e-4 * ref.scales[key], (key, err)


@pytest.mark.fullsize
def test_automl_d0_weights_match_reference_outputs(automl):
    root, image = automl
    model = efficientdet("efficientdet-d0")
    variables = convert_automl_arrays(root.weights("d0"), model)
    cls, box = jax.jit(model.apply)(variables, image)
    _assert_outputs_match(cls, box, root.outputs("d0"))


@pytest.mark.fullsize
@pytest.mark.parametrize("archive", ["d0/ckpt_tf1_ema.tar.xz", "d0/ckpt_tf2_save_weights.tar.xz"])
def test_automl_checkpoints_load_and_match(automl, archive, tmp_path):
    root, image = automl
    with tarfile.open(root.archive(archive)) as tar:
        tar.extractall(tmp_path, filter="data")
    (ckpt_dir,) = [p for p in pathlib.Path(tmp_path).iterdir() if p.is_dir()]
    # The TF1 checkpoint's raw (non-EMA) copies hold 2x the values: only EMA reads match.
    variables = load_automl_checkpoint(str(ckpt_dir), "efficientdet-d0")
    model = efficientdet("efficientdet-d0")
    cls, box = jax.jit(model.apply)(variables, image)
    _assert_outputs_match(cls, box, root.outputs("d0"))


@pytest.mark.fullsize
def test_automl_channel_attn_matches(automl):
    root, image = automl
    model = efficientdet("efficientdet-d0", fpn_weight_method="channel_attn")
    variables = convert_automl_arrays(root.weights("d0_channel_attn"), model)
    cls, box = jax.jit(model.apply)(variables, image)
    _assert_outputs_match(cls, box, root.outputs("d0_channel_attn"), levels_cls=(6, 7))


@pytest.mark.fullsize
def test_automl_lite0_matches(automl):
    root, _ = automl
    model = efficientdet("efficientdet-lite0")
    variables = convert_automl_arrays(root.weights("lite0"), model)
    cls, box = jax.jit(model.apply)(variables, root.input("lite0"))
    _assert_outputs_match(cls, box, root.outputs("lite0"), levels_cls=(6, 7))


def test_automl_converter_names_what_is_wrong(automl):
    root, _ = automl
    arrays = root.weights("d0")
    # d0's scalar fusion weights into a model that expects none (sum fusion): unused names listed.
    with pytest.raises(CheckpointMismatchError, match="WSM"):
        convert_automl_arrays(arrays, efficientdet("efficientdet-d0", fpn_weight_method="sum"))
    del arrays["class_net/class-2-bn-5/gamma"]
    with pytest.raises(CheckpointMismatchError, match="class_net/class-2-bn-5/gamma"):
        convert_automl_arrays(arrays, efficientdet("efficientdet-d0"))


@pytest.mark.torch_ref
@pytest.mark.fullsize
@pytest.mark.parametrize("name", ["tf_efficientdet_d0", "tf_efficientdet_lite0"])
def test_effdet_state_dict_matches_effdet_outputs(name):
    ref = load_torch_reference("effdet_models")
    prefix = f"{name}/sd/"
    sd = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
    variables = load_effdet_state_dict(sd, name)
    model = efficientdet(name.replace("tf_efficientdet_", "efficientdet-"))
    cls, box = jax.jit(model.apply)(variables, ref[f"{name}/input"])
    arrays = {k[len(name) + 1:]: v for k, v in ref.items() if k.startswith(f"{name}/")}
    _assert_outputs_match(cls, box, ReferenceOutputs.whole(arrays))


def _tiny(**overrides):
    """D0 wiring with a 7-block quarter-width backbone: same code paths, a fraction of the compile."""
    fields = dict(
        num_classes=3, image_size=64, fpn_num_filters=16, fpn_cell_repeats=1, box_class_repeats=2,
        backbone_overrides=(("width_coefficient", 0.25), ("depth_coefficient", 0.25)),
        cpu_kernels="off",  # compiles faster; tiny shapes make its CPU speed irrelevant
    )
    fields.update(overrides)
    return efficientdet("efficientdet-d0", **fields)


def _train_step_grads(model, key=0):
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)

    def loss(params):
        (cls, box), upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(key)},
        )
        return sum(jnp.sum(c**2) for c in cls) + sum(jnp.sum(b**2) for b in box), upd

    (value, upd), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return variables, value, upd, grads


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_each_fusion_method_trains_with_finite_gradients(method):
    variables, value, upd, grads = _train_step_grads(_tiny(fpn_weight_method=method))
    assert np.isfinite(value)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    fusion = variables["params"]["fpn_cell_0"].get("node_3_fusion")
    if method == "sum":
        assert fusion is None
    else:
        assert fusion.shape == ((2,) if "channel" not in method else (2, 16))
        assert np.abs(np.asarray(grads["fpn_cell_0"]["node_3_fusion"])).sum() > 0
    # BN statistics moved.
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(upd["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_head_drop_connect_adds_residual_and_drops_in_training():
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    plain = _tiny()
    residual = _tiny(head_drop_connect_rate=0.0)
    dropping = _tiny(head_drop_connect_rate=0.5)
    variables = jax.jit(plain.init)(jax.random.key(0), x)
    # Same parameters, but the residual changes the function.
    a = jax.jit(plain.apply)(variables, x)[0][0]
    b = jax.jit(residual.apply)(variables, x)[0][0]
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # With rate > 0, eval equals the residual model; training depends on the rng.
    np.testing.assert_allclose(np.asarray(jax.jit(dropping.apply)(variables, x)[0][0]), np.asarray(b))
    _, v1, _, _ = _train_step_grads(dropping, key=1)
    _, v2, _, _ = _train_step_grads(dropping, key=2)
    assert v1 != v2


def test_freeze_regex_and_new_class_head():
    model = _tiny()
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    mask = trainable_mask(variables["params"], r"^backbone/")
    flat = jax.tree_util.tree_flatten_with_path(mask)[0]
    assert all((not m) == (p[0].key == "backbone") for p, m in flat)
    assert all(jax.tree.leaves(trainable_mask(variables["params"], None)))

    new_model = _tiny(num_classes=7)
    fresh = jax.jit(new_model.init)(jax.random.key(5), x)
    merged, reinit = transfer_variables(variables, fresh)
    assert sorted(reinit) == [
        "params/class_net/predict/bias", "params/class_net/predict/pointwise/kernel"
    ]
    np.testing.assert_array_equal(
        merged["params"]["backbone"]["stem_conv"]["kernel"],
        variables["params"]["backbone"]["stem_conv"]["kernel"],
    )
    cls, _ = jax.jit(new_model.apply)(merged, x)
    assert cls[0].shape[-1] == 9 * 7


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="fpn_weight_method"):
        get_efficientdet_config("efficientdet-d0", fpn_weight_method="mean")
    with pytest.raises(ValueError, match="fpn_num_filter"):
        get_efficientdet_config("efficientdet-d0", fpn_num_filter=3)
    with pytest.raises(ValueError, match="min_level"):
        get_efficientdet_config("efficientdet-d0", min_level=1)
    with pytest.raises(ValueError, match="max_level > min_level"):
        get_efficientdet_config("efficientdet-d0", min_level=4, max_level=4)
    model = _tiny()
    with pytest.raises(ValueError, match="image_size"):
        model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)))


def test_bfloat16_model_keeps_float32_params_and_outputs():
    model = _tiny(dtype="bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    cls, box = jax.jit(model.apply)(variables, x)
    assert all(c.dtype == jnp.float32 for c in cls + box)
    ref_cls, _ = jax.jit(_tiny().apply)(variables, x)
    scale = float(jnp.abs(ref_cls[0]).max())
    assert float(jnp.abs(cls[0] - ref_cls[0]).max()) < 0.1 * scale


def test_stride4_levels_p2_to_p4():
    """min_level 2 takes the backbone's stride-4 feature; max_level 4 stops before P5."""
    model = efficientdet("efficientdet-d0", num_classes=3, image_size=96, min_level=2, max_level=4,
                         fpn_num_filters=16, fpn_cell_repeats=1, box_class_repeats=1)
    x = jnp.zeros((1, 96, 96, 3))
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    cls, box = jax.eval_shape(model.apply, variables, x)
    assert [c.shape[1:3] for c in cls] == [(24, 24), (12, 12), (6, 6)]
    assert [b.shape[-1] for b in box] == [9 * 4] * 3
    assert model.config.anchor_config().feature_sizes() == {2: (24, 24), 3: (12, 12), 4: (6, 6)}
