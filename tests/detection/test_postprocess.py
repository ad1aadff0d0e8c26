"""Post-processing: automl's detections (global / per class, gaussian / hard), effdet's hard NMS,
NMS properties, fixed-size outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_refs import load_torch_reference

from effdet_jax.detection.anchors import AnchorConfig, generate_anchors
from effdet_jax.detection.postprocess import PostprocessConfig, nms, postprocess

from .helpers import numpy_iou

D0_ANCHORS = AnchorConfig(aspect_ratios=(1.0, 2.0, 0.5), image_size=512)




def assert_same_detections(ours, boxes, scores, classes, valid, score_tol=1e-4):
    """Every reference detection has one of ours with IoU > 0.99 (or an identical degenerate box),
    the same class and the score to ``score_tol``; same number of detections."""
    ours = jax.device_get(ours)
    np.testing.assert_array_equal(ours["valid"], valid)
    for i in range(len(valid)):
        n = int(valid[i])
        ob, os_, oc = ours["boxes"][i, :n], ours["scores"][i, :n], ours["classes"][i, :n]
        rb, rs, rc = boxes[i, :n], scores[i, :n], classes[i, :n]
        iou = numpy_iou(rb, ob)
        iou[np.all(np.abs(rb[:, None] - ob[None]) < 1e-3, axis=-1)] = 1.0
        iou[rc[:, None] != oc[None]] = 0.0
        pair = np.argmax(iou, axis=1)
        assert np.all(iou[np.arange(n), pair] > 0.99), f"image {i}: unmatched detections"
        assert len(np.unique(pair)) == n
        np.testing.assert_allclose(os_[pair], rs, rtol=0, atol=score_tol)
        # padding rows
        assert np.all(ours["scores"][i, n:] == 0) and np.all(ours["classes"][i, n:] == -1)


@pytest.fixture(scope="module")
def d0(automl_reference):
    """automl's d0 outputs as post-processing sees them (on the compact copy: each anchor's max
    logit and class, every box output) and automl's detections."""
    cls, box = automl_reference.d0_postprocess_inputs()
    return cls, box, automl_reference.arrays("d0/detections.npz")


def _run(cls, box, anchors, image_size, scale, config):
    fn = jax.jit(lambda c, b, s: postprocess(c, b, anchors, image_size, s, config))
    return fn(cls, box, scale)


@pytest.mark.fullsize
@pytest.mark.parametrize("mode", ["global", "per_class"])
@pytest.mark.parametrize("method", ["gaussian", "hard"])
def test_matches_automl(d0, mode, method):
    cls, box, ref = d0
    config = PostprocessConfig(
        method="soft_gaussian" if method == "gaussian" else "hard", per_class=mode == "per_class"
    )
    ours = _run(cls, box, generate_anchors(D0_ANCHORS), 512, None, config)
    key = f"{mode}_{method}_"
    assert_same_detections(
        ours,
        ref[key + "boxes"],
        ref[key + "scores"],
        ref[key + "classes"].astype(np.int32) - 1,  # automl's are 1-based floats
        ref[key + "valid_len"],
    )
    if mode == "global":  # automl clips only here
        assert float(jnp.max(ours["boxes"])) <= 512.0 and float(jnp.min(ours["boxes"])) >= 0.0
    else:
        assert float(jnp.max(ours["boxes"])) > 512.0 or float(jnp.min(ours["boxes"])) < 0.0


@pytest.mark.fullsize
def test_scaled_boxes_match_automl(d0):
    cls, box, ref = d0
    ours = _run(cls, box, generate_anchors(D0_ANCHORS), 512, ref["image_scales_used"],
                PostprocessConfig())
    want = ref["global_gaussian_scaled_boxes"]
    np.testing.assert_allclose(ours["boxes"], want, rtol=0, atol=1e-3)


@pytest.mark.fullsize
def test_all_anchors_give_the_same_detections(d0):
    """automl keeps every anchor before NMS; the 5000-candidate default changes nothing here."""
    cls, box, _ = d0
    anchors = generate_anchors(D0_ANCHORS)
    top = _run(cls, box, anchors, 512, None, PostprocessConfig())
    everything = _run(cls, box, anchors, 512, None, PostprocessConfig(pre_nms_top_k=0))
    for key in ("boxes", "scores", "classes", "valid"):
        np.testing.assert_array_equal(top[key], everything[key])


@pytest.mark.torch_ref
def test_matches_effdet_hard_nms():
    """effdet: top 5000 (anchor, class) pairs, per-class hard NMS, scaled, not clipped."""
    ref = load_torch_reference("effdet_detection")
    cls = [ref[f"post/cls_{lvl}"] for lvl in range(3, 8)]
    box = [ref[f"post/box_{lvl}"] for lvl in range(3, 8)]
    config = PostprocessConfig(
        method="hard", per_class=True, candidates="top_pairs", pre_nms_top_k=5000,
        clip_boxes=False,
    )
    anchors = generate_anchors(AnchorConfig(image_size=(256, 384)))
    ours = _run(cls, box, anchors, (256, 384), ref["post/img_scale"], config)
    assert_same_detections(
        ours, ref["post/boxes"], ref["post/scores"], ref["post/classes"], ref["post/valid"]
    )


def test_fixed_shapes_padding_and_scale():
    anchors = generate_anchors(AnchorConfig(image_size=64))
    rng = np.random.default_rng(0)
    n = anchors.shape[0]
    cls = rng.normal(-6, 1, (3, n, 5)).astype(np.float32)
    cls[1, :4, 2] = 3.0  # image 1: four confident boxes, all else far below 0.001 after sigmoid
    cls[1, 4:] = -30.0
    box = np.zeros((3, n, 4), np.float32)
    out = _run(cls, box, anchors, 64, np.array([1.0, 2.0, 1.0]),
               PostprocessConfig(max_detections=20, iou_threshold=0.5))
    assert out["boxes"].shape == (3, 20, 4) and out["classes"].dtype == jnp.int32
    assert out["valid"].tolist()[1] == 4
    assert np.all(np.asarray(out["classes"][1, :4]) == 2)
    # Soft-NMS may reorder the four (equal logits, different overlaps): compare as sets.
    got = np.asarray(out["boxes"][1, :4])
    want = np.clip(anchors[:4], 0, 64) * 2.0
    np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)], rtol=1e-6)
    assert np.all(np.asarray(out["boxes"][1, 4:]) == 0)
    assert np.all(np.diff(np.asarray(out["scores"]), axis=1) <= 0)


boxes_st = st.lists(
    st.tuples(st.floats(0, 60), st.floats(0, 60), st.floats(2, 30), st.floats(2, 30),
              st.floats(0.01, 1.0), st.integers(0, 2)),
    min_size=1, max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(rows=boxes_st, per_class=st.booleans(), threshold=st.sampled_from([0.3, 0.5, 0.7]))
def test_hard_nms_never_keeps_overlapping_pairs(rows, per_class, threshold):
    arr = np.array(rows, np.float32)
    boxes = np.stack([arr[:, 0], arr[:, 1], arr[:, 0] + arr[:, 2], arr[:, 1] + arr[:, 3]], 1)
    scores, classes = arr[:, 4], arr[:, 5].astype(np.int32)
    config = PostprocessConfig(method="hard", per_class=per_class, iou_threshold=threshold,
                               max_detections=len(rows))
    idx, kept_scores, valid = jax.device_get(_nms_jit(boxes, scores, classes, config))
    kept = idx[valid]
    assert len(kept) >= 1 and len(set(kept.tolist())) == len(kept)
    iou = numpy_iou(boxes[kept], boxes[kept])
    np.fill_diagonal(iou, 0.0)
    if per_class:
        iou[classes[kept][:, None] != classes[kept][None]] = 0.0
    assert np.all(iou <= threshold + 1e-6)
    # every box that was dropped overlaps a kept, higher-scored box (of its class)
    dropped = np.setdiff1d(np.arange(len(rows)), kept)
    if len(dropped):
        cross = numpy_iou(boxes[dropped], boxes[kept])
        if per_class:
            cross[classes[dropped][:, None] != classes[kept][None]] = 0.0
        assert np.all(cross.max(axis=1) > threshold - 1e-6)
    np.testing.assert_array_equal(kept_scores[valid], scores[kept])


_nms_jit = jax.jit(nms, static_argnums=(3,))


def test_soft_gaussian_weights_and_order():
    """Two boxes with IoU 0.5: the second is rescored by exp(-0.5^2 / 0.5), the paper's sigma."""
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.3], np.float32)
    classes = np.zeros(3, np.int32)
    idx, s, valid = _nms_jit(boxes, scores, classes, PostprocessConfig(max_detections=3))
    assert idx.tolist() == [0, 1, 2] and bool(valid.all())
    np.testing.assert_allclose(s, [0.9, 0.8 * np.exp(-0.25 / 0.5), 0.3], rtol=1e-6)
    lin = PostprocessConfig(method="soft_linear", iou_threshold=0.3, max_detections=3)
    idx, s, valid = _nms_jit(boxes, scores, classes, lin)
    np.testing.assert_allclose(s, [0.9, 0.4, 0.3], rtol=1e-6)
