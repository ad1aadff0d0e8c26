"""The export's parity verdict: a written float32 file that does not reproduce the model makes
the export command fail, naming the format, what it misses and the file (real StableHLO and
ONNX files of a tiny D0, judged against the JAX model's outputs moved off by a known amount);
near-tied detections in either order pass, another class or a moved box does not."""

import json

import jax
import numpy as np
import pytest

from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.export import check_images, export_model, parity, serving
from effdet_jax.export.command import incomplete_message, summary_lines
from effdet_jax.export.options import ExportOptions

SIZE = 64  # the image size of the `tiny` fixture (conftest.py)




def _reference(model, variables, images, with_nms):
    pp = PostprocessConfig() if with_nms else None
    fn = serving.make_serving_fn(model, variables, pp, None)
    return [np.asarray(x) for x in jax.jit(fn)(images)]


def test_raw_file_off_the_reference_fails_the_export(tiny, tmp_path):
    model, variables = tiny
    images = check_images(2, SIZE, SIZE, seed=5)
    reference = _reference(model, variables, images, with_nms=False)
    options = ExportOptions(("stablehlo", "onnx"), 2, False, "float32")

    good = export_model(model, variables, options, PostprocessConfig(), str(tmp_path / "good"),
                        images=images, reference=reference)
    assert not good.parity_failures and incomplete_message(good, str(tmp_path)) is None

    # 1e-3 of the first output's scale off: 10x the bar, for both files.
    moved = [x.copy() for x in reference]
    moved[0] = moved[0] + 1e-3 * np.abs(moved[0]).max()
    bad = export_model(model, variables, options, PostprocessConfig(), str(tmp_path / "bad"),
                       images=images, reference=moved)
    assert set(bad.parity_failures) == {"stablehlo", "onnx"}
    for fmt in ("stablehlo", "onnx"):
        assert bad.parity[fmt]["raw_relative"] == pytest.approx(1e-3, rel=0.05)
        assert "of the output scale (bar 0.0001)" in bad.parity_failures[fmt]
    message = incomplete_message(bad, str(tmp_path / "bad"))
    assert "onnx FAILS PARITY" in message and bad.written["onnx"] in message
    assert "do not deploy" in message
    assert any("FAILS PARITY" in line for line in summary_lines(bad))
    manifest = json.loads(open(bad.manifest).read())
    assert set(manifest["parity_failures"]) == {"stablehlo", "onnx"}


def _detections(scores, classes):
    """NMS outputs of one image: boxes ``[1, k, 4]`` of distinct 40-px squares, in row order."""
    k = len(scores)
    offsets = np.arange(k, dtype=np.float32)[:, None] * 50.0
    boxes = (np.array([[0, 0, 40, 40]], np.float32) + offsets)[None]
    return [boxes, np.array([scores], np.float32), np.array([classes], np.int32),
            np.array([k], np.int32)]


def test_near_tied_detections_in_either_order_pass():
    reference = _detections([0.9, 0.7, 0.69995, 0.5], [1, 2, 3, 1])
    swapped = [x.copy() for x in reference]
    for i in (0, 2):  # boxes and classes of rows 1 and 2 exchanged
        swapped[i][0, [1, 2]] = reference[i][0, [2, 1]]
    swapped[1][0, [1, 2]] = reference[1][0, [2, 1]]
    record = parity.compare(reference, swapped, with_nms=True)
    assert record["class_mismatches"] == 2 and record["untied_class_mismatches"] == 0
    assert record["box_px"] == 50.0 and record["untied_box_rel"] == 0.0
    assert parity.failures(record, with_nms=True) == []


def test_a_count_difference_beyond_the_top_20_passes():
    reference = _detections([1.0 - 0.01 * i for i in range(25)], [i % 4 for i in range(25)])
    more = [x.copy() for x in reference]
    more[3][0] = 26  # one more detection, beyond the top 20
    record = parity.compare(reference, more, with_nms=True)
    assert record["valid_mismatches"] == 1 and record["top_k_valid_mismatches"] == 0
    assert parity.failures(record, with_nms=True) == []


def test_detections_off_the_model_fail():
    reference = _detections([0.9, 0.7, 0.6, 0.5], [1, 2, 3, 1])
    other = [x.copy() for x in reference]
    other[2][0, 2] = 0  # another class on an untied row
    other[0][0, 3] += 0.1  # 0.1 px on a 40-px box: 2.5e-3 of its extent
    other[3][0] = 3
    missed = parity.failures(parity.compare(reference, other, with_nms=True), with_nms=True)
    assert any("1 of the top 20 detections have another class" in m for m in missed), missed
    assert any("boxes differ by 0.0025 of their extent" in m for m in missed), missed
    assert any("the number of detections (up to 20) differs on 1 images" in m for m in missed), missed


def test_near_ties_marks_both_rows_of_a_tie():
    scores = np.array([[0.9, 0.8, 0.79995, 0.5, 0.0, 0.0]])
    np.testing.assert_array_equal(parity.near_ties(scores),
                                  [[False, True, True, False, True, True]])
