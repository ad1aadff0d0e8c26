"""Anchors and the box coder: automl and effdet reference anchors, layout, coder properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_refs import load_torch_reference

from effdet_jax.detection import box_coder
from effdet_jax.detection.anchors import (
    AnchorConfig,
    generate_anchors,
    num_anchors,
    num_anchors_per_level,
    num_anchors_per_location,
)

AUTOML_ASPECTS = (1.0, 2.0, 0.5)  # what automl's reference was generated with (w/h scalars)


def test_d0_anchors_match_automl(automl_reference):
    ref = automl_reference.arrays("common/anchors.npz")["boxes"]
    ours = generate_anchors(AnchorConfig(aspect_ratios=AUTOML_ASPECTS, image_size=512))
    assert ours.shape == ref.shape == (49104, 4) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_lite0_anchors_match_automl(automl_reference):
    """320 input: strides are not integers at P7 (320/3) and anchor_scale is 3."""
    ref = automl_reference.arrays("lite0/anchors.npz")["boxes"]
    cfg = AnchorConfig(aspect_ratios=AUTOML_ASPECTS, anchor_scale=3.0, image_size=320)
    assert cfg.feature_sizes() == {3: (40, 40), 4: (20, 20), 5: (10, 10), 6: (5, 5), 7: (3, 3)}
    ours = generate_anchors(cfg)
    assert ours.shape == ref.shape == (19206, 4)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


@pytest.mark.torch_ref
@pytest.mark.parametrize("name", ["anchors_a", "anchors_b"])
def test_anchors_match_effdet(name):
    """Non-square inputs, (x, y) pair and scalar aspects, one anchor scale per level."""
    ref = load_torch_reference("effdet_detection")
    scale = tuple(float(s) for s in ref[f"{name}/anchor_scale"])
    aspect = ref[f"{name}/aspect"]
    aspect = tuple(tuple(a) for a in aspect) if aspect.ndim == 2 else tuple(aspect)
    cfg = AnchorConfig(
        aspect_ratios=aspect,
        anchor_scale=scale[0] if len(scale) == 1 else scale,
        image_size=tuple(int(v) for v in ref[f"{name}/image_hw"]),
    )
    ours = generate_anchors(cfg)
    np.testing.assert_allclose(ours, ref[f"{name}/boxes"], rtol=0, atol=1e-4)


def test_layout_counts_and_order():
    cfg = AnchorConfig(image_size=(256, 384))
    assert num_anchors_per_location(cfg) == 9
    per_level = num_anchors_per_level(cfg)
    assert per_level == {3: 32 * 48 * 9, 4: 16 * 24 * 9, 5: 8 * 12 * 9, 6: 4 * 6 * 9, 7: 2 * 3 * 9}
    boxes = generate_anchors(cfg)
    assert boxes.shape == (num_anchors(cfg), 4)
    # Within P3: rows are (y, x, octave, aspect). The first 9 share the first cell's center, the
    # next 9 are one stride to the right, and row W*9 starts the second row of cells.
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2
    np.testing.assert_allclose(centers[:9], np.tile([[4.0, 4.0]], (9, 1)), rtol=1e-6)
    np.testing.assert_allclose(centers[9], [4.0, 12.0])
    np.testing.assert_allclose(centers[48 * 9], [12.0, 4.0])
    sizes = boxes[:9, 2:] - boxes[:9, :2]  # (h, w) of octave 0 aspect (1,1): 4 * stride
    np.testing.assert_allclose(sizes[0], [32.0, 32.0])
    np.testing.assert_allclose(sizes[1], [32.0 * 0.7, 32.0 * 1.4], rtol=1e-6)  # aspect (1.4, 0.7)
    np.testing.assert_allclose(sizes[3], [32.0 * 2 ** (1 / 3)] * 2, rtol=1e-6)  # octave 1
    # Level 4 starts right after level 3.
    np.testing.assert_allclose(centers[per_level[3]], [8.0, 8.0])


def test_config_is_hashable_and_validated():
    a = AnchorConfig(aspect_ratios=[[1.0, 1.0], [1.4, 0.7]], image_size=[320, 320])
    b = AnchorConfig(aspect_ratios=((1.0, 1.0), (1.4, 0.7)), image_size=(320, 320))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(ValueError):
        AnchorConfig(anchor_scale=(4.0, 4.0))


box_strategy = st.tuples(
    st.floats(-200, 600), st.floats(-200, 600), st.floats(1.0, 400), st.floats(1.0, 400)
)


@settings(max_examples=60, deadline=None)
@given(box=box_strategy, anchor=box_strategy)
def test_encode_decode_identity(box, anchor):
    def yxyx(b):
        y, x, h, w = b
        return np.array([y, x, y + h, x + w], np.float32)

    b, a = yxyx(box), yxyx(anchor)
    deltas = box_coder.encode(b[None], a[None])
    back = np.asarray(box_coder.decode(deltas, a[None]))[0]
    np.testing.assert_allclose(back, b, rtol=1e-5, atol=1e-3)


def test_zero_deltas_decode_to_anchor():
    anchors = generate_anchors(AnchorConfig(image_size=128))
    np.testing.assert_allclose(
        box_coder.decode(np.zeros_like(anchors), anchors), anchors, rtol=0, atol=1e-4
    )
    np.testing.assert_allclose(box_coder.encode(anchors, anchors), 0.0, atol=1e-6)
