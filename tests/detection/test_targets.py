"""Target assignment: automl's and effdet's labelers, edge cases, padding, level flattening."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torch_refs import load_torch_reference

from effdet_jax.detection.anchors import AnchorConfig, generate_anchors
from effdet_jax.detection.targets import (
    assign_targets,
    first_argmax,
    flatten_level_outputs,
    split_levels,
)

from .helpers import numpy_iou

D0_ANCHORS = AnchorConfig(aspect_ratios=(1.0, 2.0, 0.5), image_size=512)
SMALL = AnchorConfig(image_size=128)


@pytest.fixture(scope="module")
def assign_jit():
    return jax.jit(assign_targets, static_argnums=(3,), static_argnames=("matched_threshold",
                                                                           "unmatched_threshold"))


def test_labels_match_automl(automl_reference, assign_jit):
    """cls targets and num_positives exactly; box targets to float32 rounding."""
    ref = automl_reference.arrays("common/labels.npz")
    gt_classes = np.where(ref["gt_classes"] > 0, ref["gt_classes"] - 1, -1)  # 1-based -> 0-based
    out = assign_jit(ref["gt_boxes"], gt_classes, generate_anchors(D0_ANCHORS), 90)
    sizes = list(D0_ANCHORS.feature_sizes().values())
    cls_levels = split_levels(out["cls_targets"], sizes)
    box_levels = split_levels(out["box_targets"], sizes)
    for i, level in enumerate(range(3, 8)):
        np.testing.assert_array_equal(cls_levels[i], ref[f"cls_targets_{level}"])
        np.testing.assert_allclose(box_levels[i], ref[f"box_targets_{level}"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["num_positives"], ref["num_positives"])
    # Quirk 1's source: image 1's gt equal to a P3 anchor gives an all-zero positive target.
    positive = np.asarray(out["cls_targets"][1]) >= 0
    assert np.any(positive & np.all(np.asarray(out["box_targets"][1]) == 0, axis=-1))


@pytest.mark.torch_ref
def test_labels_match_effdet(assign_jit):
    ref = load_torch_reference("effdet_detection")
    anchors = generate_anchors(AnchorConfig(image_size=(256, 384)))
    out = assign_jit(ref["labels/gt_boxes"], ref["labels/gt_classes"], anchors, 6)
    np.testing.assert_array_equal(out["cls_targets"], ref["labels/cls_targets"])
    np.testing.assert_allclose(out["box_targets"], ref["labels/box_targets"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out["num_positives"], ref["labels/num_positives"])
    assert float(out["num_positives"][1]) == 0.0  # the image without boxes


def test_no_gt_zero_area_and_outside_boxes(assign_jit):
    anchors = generate_anchors(SMALL)
    boxes = np.full((3, 4, 4), -1.0, np.float32)
    classes = np.full((3, 4), -1, np.int32)
    # image 1: a zero-area box and a box that overlaps no anchor, both class 2
    boxes[1, :2] = [[10, 10, 10, 50], [1000, 1000, 1040, 1040]]
    classes[1, :2] = 2
    # image 2: one real box next to a zero-area one
    boxes[2, :2] = [[20, 20, 60, 60], [30, 30, 30, 30]]
    classes[2, :2] = [1, 4]
    out = jax.device_get(assign_jit(boxes, classes, anchors, 5))
    for i in (0, 1):
        assert np.all(out["cls_targets"][i] == -1) and np.all(out["box_targets"][i] == 0)
        assert out["num_positives"][i] == 0
    assert np.all(np.isfinite(out["box_targets"]))
    assert set(np.unique(out["cls_targets"][2])) == {-1, 1}
    assert out["num_gt"].tolist() == [0, 1, 1]  # the far box is valid, it just matches nothing


def test_partly_outside_box_matches(assign_jit):
    anchors = generate_anchors(SMALL)
    boxes = np.array([[[-20.0, -20.0, 40.0, 40.0]]], np.float32)
    out = jax.device_get(assign_jit(boxes, np.array([[3]]), anchors, 5))
    assert out["num_positives"][0] >= 1
    assert set(np.unique(out["cls_targets"][0])) == {-1, 3}


def test_force_match_tiny_box(assign_jit):
    anchors = generate_anchors(SMALL)
    boxes = np.array([[[50.0, 50.0, 52.0, 53.0]]], np.float32)
    out = jax.device_get(assign_jit(boxes, np.array([[0]]), anchors, 5))
    assert out["num_positives"][0] == 1  # IoU far below 0.5: only the force-match
    (row,) = np.nonzero(out["cls_targets"][0] == 0)[0]
    ious = numpy_iou(boxes[0], anchors)[0]
    assert row == np.argmax(ious)




def test_crowd_and_between_thresholds_are_ignored(assign_jit):
    anchors = generate_anchors(SMALL)
    boxes = np.array([[[10.0, 10.0, 70.0, 70.0], [64.0, 64.0, 128.0, 128.0]]], np.float32)
    classes = np.array([[1, -2]])  # second box is a crowd region
    out = jax.device_get(
        assign_jit(boxes, classes, anchors, 5, matched_threshold=0.5, unmatched_threshold=0.4)
    )
    iou = numpy_iou(boxes[0], anchors)
    cls = out["cls_targets"][0]
    real, crowd = iou[0], iou[1]
    # positives only from the real box; num_positives counts them and nothing else
    assert set(np.unique(cls[cls >= 0])) == {1}
    assert out["num_positives"][0] == np.sum(cls >= 0)
    between = (real >= 0.4) & (real < 0.5) & (cls != 1)
    assert between.any() and np.all(cls[between] == -2)
    crowd_only = (real < 0.4) & (crowd >= 0.4)
    assert crowd_only.any() and np.all(cls[crowd_only] == -2)
    assert np.all(cls[(real < 0.4) & (crowd < 0.4)] == -1)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_first_argmax_is_numpys_argmax(axis):
    """Ties everywhere (small integers) and -1 rows: the first index of the max, as np.argmax."""
    x = np.random.default_rng(axis + 5).integers(-1, 3, (7, 300)).astype(np.float32)
    x[2] = -1.0
    got = jax.jit(lambda x: first_argmax(x, jnp.max(x, axis=axis), axis))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(x, axis=axis))


def test_compiles_once_for_any_box_count():
    anchors = generate_anchors(SMALL)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(b, c):
        return assign_targets(b, c, anchors, 5)["num_positives"]

    rng = np.random.default_rng(0)
    for n in (0, 3, 100):  # the pipeline pads every image to max_instances rows
        y0 = rng.uniform(0, 100, (n, 2))
        b = np.full((100, 4), -1.0, np.float32)
        c = np.full((100,), -1, np.int32)
        b[:n] = np.concatenate([y0, y0 + rng.uniform(5, 40, (n, 2))], 1)
        c[:n] = rng.integers(0, 5, n)
        step(b[None], c[None])


def test_flatten_matches_anchor_order():
    cfg = AnchorConfig(image_size=(64, 96))
    anchors = generate_anchors(cfg)
    sizes = list(cfg.feature_sizes().values())
    per_level = split_levels(jnp.asarray(anchors)[None], sizes)
    assert [x.shape for x in per_level] == [(1, h, w, 36) for h, w in sizes]
    np.testing.assert_array_equal(flatten_level_outputs(per_level, 4)[0], anchors)
