"""Losses: automl's numbers (losses.json), effdet's DetectionLoss, properties, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec
from torch_refs import load_torch_reference

from effdet_jax.detection.anchors import AnchorConfig, generate_anchors, num_anchors_per_level
from effdet_jax.detection.losses import (
    IOU_LOSS_TYPES,
    LossConfig,
    box_iou,
    box_iou_loss,
    detection_loss,
    focal_loss,
    focal_loss_sum,
    l2_regularization,
    per_level_losses,
)
from effdet_jax.detection.targets import assign_targets, flatten_level_outputs

D0_ANCHORS = AnchorConfig(aspect_ratios=(1.0, 2.0, 0.5), image_size=512)
RTOL = 1e-5


@pytest.fixture(scope="module")
def automl_targets(automl_reference):
    """automl's labels assigned to the d0 anchors, the anchors and the expected losses."""
    labels = automl_reference.arrays("common/labels.npz")
    expected = automl_reference.json("common/losses.json")
    anchors = generate_anchors(D0_ANCHORS)
    gt_classes = np.where(labels["gt_classes"] > 0, labels["gt_classes"] - 1, -1)
    targets = assign_targets(labels["gt_boxes"], gt_classes, anchors, 90)
    return targets, anchors, expected


@pytest.fixture(scope="module")
def automl_case(automl_reference, automl_targets):
    """d0's full outputs (skips on the compact copy: the loss values need every logit), automl's
    targets and the expected losses."""
    cls, box = automl_reference.d0_full_outputs()
    return cls, box, *automl_targets


def _loss(config):
    return jax.jit(lambda c, b, t, a: detection_loss(c, b, t, a, config))


@pytest.mark.fullsize
def test_default_and_label_smoothing_match_automl(automl_case):
    cls, box, targets, anchors, expected = automl_case
    _, parts = _loss(LossConfig())(cls, box, targets, anchors)
    for key in ("cls_loss", "box_loss", "det_loss"):
        np.testing.assert_allclose(parts[key], expected["loss_default"][key], rtol=RTOL)
    np.testing.assert_allclose(parts["num_positives_sum"], expected["num_positives_sum_normalizer"])
    _, parts = _loss(LossConfig(label_smoothing=0.1))(cls, box, targets, anchors)
    for key in ("cls_loss", "box_loss", "det_loss"):
        np.testing.assert_allclose(parts[key], expected["loss_label_smoothing_0.1"][key], rtol=RTOL)


@pytest.mark.fullsize
def test_per_level_match_automl(automl_case):
    cls, box, targets, _, expected = automl_case
    levels = per_level_losses(cls, box, targets, num_anchors_per_level(D0_ANCHORS))
    assert set(levels) == set(expected["per_level"])
    for key, value in levels.items():
        np.testing.assert_allclose(value, expected["per_level"][key], rtol=RTOL, err_msg=key)


@pytest.mark.fullsize
@pytest.mark.parametrize("iou_type", IOU_LOSS_TYPES)
def test_iou_losses_match_automl_batch_major(automl_case, iou_type):
    """Quirk 2 fixed: rows decoded against their own anchors = automl's batch-major numbers."""
    cls, box, targets, anchors, expected = automl_case
    _, parts = _loss(LossConfig(iou_loss_type=iou_type))(cls, box, targets, anchors)
    want = expected[f"box_iou_loss_{iou_type}_batch_major_rows"]
    np.testing.assert_allclose(parts["box_iou_loss"], want, rtol=RTOL)
    np.testing.assert_allclose(
        parts["det_loss"], expected["loss_default"]["det_loss"] + want, rtol=RTOL
    )


@pytest.mark.fullsize
def test_automl_quirk2_is_the_level_major_misalignment(automl_reference, automl_targets):
    """automl's own value comes from level-major rows decoded against batch-major tiled anchors;
    rebuilding that misalignment with our per-row loss reproduces it (ours differs only by it).
    Box outputs only, so it runs on the compact copy too (d0's box outputs are whole in both)."""
    _, box = automl_reference.d0_postprocess_inputs()
    targets, anchors, expected = automl_targets
    batch = box[0].shape[0]
    level_rows = np.cumsum([0] + list(num_anchors_per_level(D0_ANCHORS).values()))
    box_targets = np.asarray(targets["box_targets"])
    # automl: concat_L reshape(x_L, [-1, 4]) -> rows (level, batch, y, x, a)
    out_rows = np.concatenate([x.reshape(-1, 4) for x in box])
    bounds = zip(level_rows[:-1], level_rows[1:], strict=True)
    tgt_rows = np.concatenate([box_targets[:, s:e].reshape(-1, 4) for s, e in bounds])
    tiled = np.tile(anchors, (batch, 1))  # rows (batch, level, y, x, a)
    normalizer = float(np.sum(targets["num_positives"]) + 1)
    for iou_type in ("ciou", "giou"):
        value = jnp.sum(box_iou_loss(out_rows, tgt_rows, tiled, iou_type)) / (4 * normalizer)
        want = expected[f"loss_iou_{iou_type}"]["box_iou_loss"]
        np.testing.assert_allclose(value, want, rtol=RTOL)


def test_l2_matches_automl(automl_reference):
    expected = automl_reference.json("common/losses.json")
    weights = automl_reference.weights("d0")
    tree: dict = {}
    for name in weights:  # "a/b/kernel" -> nested dicts, like a flax params tree
        *scopes, leaf = name.split("/")
        node = tree
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = weights[name]
    value = jax.jit(l2_regularization)(tree)
    np.testing.assert_allclose(value, expected["reg_l2_loss"], rtol=RTOL)
    np.testing.assert_allclose(
        l2_regularization(tree, 1.0) * expected["weight_decay"], expected["reg_l2_loss"], rtol=RTOL
    )


def test_l2_counts_kernels_only():
    tree = {
        "conv": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(3)},
        "sep": {"depthwise_kernel": jnp.ones((3,)), "pointwise_kernel": jnp.ones((1,))},
        "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4), "mean": jnp.ones(4)},
        "WSM": jnp.ones(()),
        "WSM_1": jnp.ones(()),
    }
    np.testing.assert_allclose(l2_regularization(tree, 1.0), 0.5 * (16.0 + 3.0 + 1.0))


@pytest.mark.torch_ref
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_detection_loss_matches_effdet(smoothing):
    """effdet's DetectionLoss (new focal loss) with some anchors marked -2 (ignored)."""
    ref = load_torch_reference("effdet_detection")
    cls = [ref[f"loss/cls_{lvl}"] for lvl in range(3, 8)]
    box = [ref[f"loss/box_{lvl}"] for lvl in range(3, 8)]
    targets = {k: ref[f"loss/{k}"] for k in ("cls_targets", "box_targets", "num_positives")}
    assert np.any(targets["cls_targets"] == -2)
    anchors = generate_anchors(AnchorConfig(image_size=(256, 384)))
    total, parts = _loss(LossConfig(label_smoothing=smoothing))(cls, box, targets, anchors)
    np.testing.assert_allclose(parts["cls_loss"], ref[f"loss/ls{smoothing}/cls"], rtol=RTOL)
    np.testing.assert_allclose(parts["box_loss"], ref[f"loss/ls{smoothing}/box"], rtol=RTOL)
    np.testing.assert_allclose(total, ref[f"loss/ls{smoothing}/total"], rtol=RTOL)


def _small_case(seed=0, batch=8, dtype=jnp.float32):
    cfg = AnchorConfig(image_size=64)
    anchors = generate_anchors(cfg)
    rng = np.random.default_rng(seed)
    y0 = rng.uniform(0, 40, (batch, 3, 2))
    boxes = np.concatenate([y0, y0 + rng.uniform(6, 30, (batch, 3, 2))], -1).astype(np.float32)
    classes = rng.integers(-1, 4, (batch, 3)).astype(np.int32)
    targets = assign_targets(boxes, classes, anchors, 4)
    n = anchors.shape[0]
    cls = jnp.asarray(rng.normal(-2, 2, (batch, n, 4)), dtype)
    box = jnp.asarray(rng.normal(0, 0.3, (batch, n, 4)), dtype)
    return cls, box, targets, anchors


def test_bfloat16_outputs_give_float32_loss():
    cls, box, targets, anchors = _small_case()
    config = LossConfig(iou_loss_type="ciou")
    total16, parts16 = detection_loss(
        cls.astype(jnp.bfloat16), box.astype(jnp.bfloat16), targets, anchors, config
    )
    assert total16.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in parts16.values())
    # Equal to the float32 loss of the bf16-rounded outputs: nothing else is computed in bf16.
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (cls, box)]
    total32, _ = detection_loss(*rounded, targets, anchors, config)
    np.testing.assert_allclose(total16, total32, rtol=1e-6)


def test_normaliser_is_global_under_sharding():
    """Sharding the batch over 8 devices gives the single-device loss (sum over global batch)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    cls, box, targets, anchors = _small_case(batch=8)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    args = jax.tree.map(sharded, (cls, box, dict(targets)))
    config = LossConfig(iou_loss_type="giou")
    fn = jax.jit(lambda c, b, t: detection_loss(c, b, t, anchors, config)[0])
    np.testing.assert_allclose(fn(*args), fn(cls, box, dict(targets)), rtol=1e-6)
    # and it is not the mean of per-shard losses (each shard would use its own normaliser)
    per_image = [
        fn(cls[i : i + 1], box[i : i + 1], {k: v[i : i + 1] for k, v in targets.items()})
        for i in range(8)
    ]
    assert abs(float(np.mean(per_image)) - float(fn(cls, box, dict(targets)))) > 1e-4


def test_per_level_inputs_equal_flat_inputs():
    cfg = AnchorConfig(image_size=64)
    cls, box, targets, anchors = _small_case(batch=2)
    sizes = list(cfg.feature_sizes().values())
    from effdet_jax.detection.targets import split_levels

    cls_levels, box_levels = split_levels(cls, sizes), split_levels(box, sizes)
    np.testing.assert_array_equal(flatten_level_outputs(cls_levels, 4), cls)
    config = LossConfig(iou_loss_type="diou")
    np.testing.assert_allclose(
        detection_loss(cls_levels, box_levels, targets, anchors, config)[0],
        detection_loss(cls, box, targets, anchors, config)[0],
        rtol=1e-6,
    )


# ---------------------------------------------------------------- properties


def _naive_focal(x, y, alpha, gamma, smoothing):
    p = 1 / (1 + np.exp(-x))
    p_t = y * p + (1 - y) * (1 - p)
    ys = y * (1 - smoothing) + 0.5 * smoothing
    ce = -(ys * np.log(p) + (1 - ys) * np.log(1 - p))
    return (y * alpha + (1 - y) * (1 - alpha)) * (1 - p_t) ** gamma * ce


# |x| <= 20: beyond that the naive formula's own ``1 - p`` loses precision even in float64 (at x=30
# its relative error is ~1e-3), so it stops being a reference; extreme logits are covered below.
@settings(max_examples=80, deadline=None)
@given(
    x=st.floats(-20, 20),
    y=st.sampled_from([0.0, 1.0]),
    gamma=st.sampled_from([0.0, 0.5, 1.5, 2.0]),
    smoothing=st.sampled_from([0.0, 0.1]),
)
def test_focal_equals_naive_formula(x, y, gamma, smoothing):
    naive = _naive_focal(np.float64(x), y, 0.25, gamma, smoothing)
    if not np.isfinite(naive):
        return
    ours = float(focal_loss(jnp.float32(x), jnp.float32(y), 0.25, gamma, smoothing))
    np.testing.assert_allclose(ours, naive, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5, 2.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_finite_at_extreme_logits(gamma, smoothing):
    x = jnp.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], jnp.float32)
    for y in (0.0, 1.0):
        target = jnp.full_like(x, y)
        fn = lambda z, t=target: jnp.sum(focal_loss(z, t, 0.25, gamma, smoothing))
        value, grad = jax.value_and_grad(fn)(x)
        assert np.isfinite(value) and np.all(np.isfinite(grad)), (y, value, grad)
        assert np.all(np.asarray(focal_loss(x, target, 0.25, gamma, smoothing)) >= 0)


def _autodiff_focal(x, y, alpha, gamma, smoothing):
    """The textbook form, differentiated by JAX: the reference for the hand-written VJP."""
    log_p, log_not_p = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
    modulating = jnp.exp(gamma * (y * log_not_p + (1 - y) * log_p))
    y_ce = y * (1 - smoothing) + 0.5 * smoothing
    ce = -(y_ce * log_p + (1 - y_ce) * log_not_p)
    return (y * alpha + (1 - y) * (1 - alpha)) * modulating * ce


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5, 2.0])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_focal_sum_value_and_gradient_match_autodiff(gamma, smoothing):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 6, (2, 300, 7)).clip(-20, 20), jnp.float32)
    cls_targets = jnp.asarray(rng.integers(-2, 7, (2, 300)), jnp.int32)  # -2 ignore, -1 background
    one_hot = jax.nn.one_hot(cls_targets, 7)
    keep = (cls_targets != -2)[..., None]

    def reference(x):
        return jnp.sum(jnp.where(keep, _autodiff_focal(x, one_hot, 0.25, gamma, smoothing), 0.0))

    fused = lambda x: focal_loss_sum(x, cls_targets, 0.25, gamma, smoothing)  # noqa: E731
    value, grad = jax.jit(jax.value_and_grad(fused))(logits)
    ref_value, ref_grad = jax.jit(jax.value_and_grad(reference))(logits)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[~np.asarray(keep)[..., 0]] == 0)  # ignored anchors: no gradient
    # bfloat16 logits get a bfloat16 gradient of the same values.
    grad16 = jax.grad(fused)(logits.astype(jnp.bfloat16))
    assert grad16.dtype == jnp.bfloat16


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5])
def test_fused_focal_sum_finite_at_extreme_logits(gamma):
    x = jnp.array([[[-1e4, -100.0, 0.0, 100.0, 1e4]] * 3], jnp.float32)  # [1, 3, 5]
    cls_targets = jnp.array([[0, 4, -1]], jnp.int32)
    for smoothing in (0.0, 0.1):
        value, grad = jax.value_and_grad(
            lambda z, s=smoothing: focal_loss_sum(z, cls_targets, 0.25, gamma, s))(x)
        assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Without smoothing: a confident wrong logit is pushed back, a confident right one is left.
    assert grad.shape == x.shape
    grad = jax.grad(lambda z: focal_loss_sum(z, cls_targets, 0.25, gamma, 0.0))(x)
    assert grad[0, 0, 4] > 0.1 and grad[0, 0, 0] < 0 and abs(grad[0, 0, 1]) < 1e-6


box_st = st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 80), st.floats(0.5, 80))


def _yxyx(b):
    y, x, h, w = b
    return np.array([y, x, y + h, x + w], np.float32)


@settings(max_examples=60, deadline=None)
@given(a=box_st, b=box_st, iou_type=st.sampled_from(IOU_LOSS_TYPES))
def test_iou_losses_zero_for_identical_and_in_range(a, b, iou_type):
    pa, pb = _yxyx(a), _yxyx(b)
    assert abs(1.0 - float(box_iou(pa, pa, iou_type))) < 1e-5
    value = float(box_iou(pa, pb, iou_type))
    low = {"iou": 0.0, "giou": -1.0, "diou": -1.0, "ciou": -2.0}[iou_type]
    assert low - 1e-6 <= value <= 1.0 + 1e-6
    grad = jax.grad(lambda p: box_iou(p, pb, iou_type))(pa)
    assert np.all(np.isfinite(grad))
    # The per-anchor loss through the coder: zero when the prediction equals the target.
    anchor = np.array([[10.0, 10.0, 50.0, 60.0]], np.float32)
    deltas = np.array([[0.1, -0.2, 0.3, 0.05]], np.float32)
    np.testing.assert_allclose(box_iou_loss(deltas, deltas, anchor, iou_type), 0.0, atol=1e-5)
