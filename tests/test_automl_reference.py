"""The compact automl copy (tests/reference/automl) decodes to exactly the full folder's data.

Runs where the full ``../shared/reference/automl`` is present (CI); skips on a plain clone.
"""

import numpy as np
import pytest
from automl_reference import COMPACT_ROOT, AutomlReference

MODELS = ("d0", "lite0", "d0_channel_attn")


@pytest.fixture(scope="module")
def copies(automl_reference) -> tuple[AutomlReference, AutomlReference]:
    if not automl_reference.full:
        pytest.skip("checks the compact copy against ../shared/reference/automl, absent here")
    return AutomlReference(COMPACT_ROOT, False), automl_reference


@pytest.mark.parametrize("model", MODELS)
def test_weights_and_inputs_are_bit_exact(copies, model):
    compact, full = copies
    ours, want = compact.weights(model), full.weights(model)
    assert list(ours) == list(want)
    for name, value in want.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        np.testing.assert_array_equal(ours[name].view(np.uint32), value.view(np.uint32), name)
    np.testing.assert_array_equal(compact.input(model), full.input(model))


@pytest.mark.parametrize("model", MODELS)
def test_sampled_outputs_are_the_full_outputs_at_their_positions(copies, model):
    compact, full = copies
    ours, want = compact.outputs(model), full.outputs(model)
    assert ours.keys() == want.keys() and ours.scales == want.scales
    for key in want.keys():
        np.testing.assert_array_equal(ours.select(key, want.arrays[key]), ours.arrays[key], key)
    levels = {int(key.split("_")[1]) for key in want.keys()}
    assert levels == set(ours.index) == {3, 4, 5, 6, 7}


@pytest.mark.parametrize("name", ["common/anchors.npz", "common/labels.npz", "lite0/anchors.npz",
                                  "d0/detections.npz"])
def test_whole_files_are_equal(copies, name):
    compact, full = copies
    ours, want = compact.arrays(name), full.arrays(name)
    assert list(ours) == list(want)
    for key, value in want.items():
        np.testing.assert_array_equal(ours[key], value, key)


def test_postprocess_inputs_keep_each_anchors_max_logit_and_class(copies):
    compact, full = copies
    (cls, box), (full_cls, full_box) = compact.d0_postprocess_inputs(), full.d0_postprocess_inputs()
    for ours, want in zip(box, full_box, strict=True):
        np.testing.assert_array_equal(ours, want)
    for ours, want in zip(cls, full_cls, strict=True):
        assert ours.shape == want.shape
        ours, want = ours.reshape(*ours.shape[:3], -1, 90), want.reshape(*want.shape[:3], -1, 90)
        np.testing.assert_array_equal(ours.max(-1), want.max(-1))
        np.testing.assert_array_equal(ours.argmax(-1), want.argmax(-1))
