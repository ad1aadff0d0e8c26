"""Malformed ground truth in a COCO json: evaluation applies the training pipeline's box rule
(``box_rules``), never crashes, counts each case, and scores exactly as pycocotools does on the
same json cleaned by hand; a clean json passes through unchanged."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from effdet_jax.data.box_rules import sanitize_coco_dataset
from effdet_jax.data.label_map import from_categories
from effdet_jax.data.sanitize import sanitize_boxes
from effdet_jax.data.sources.coco_json import CocoJsonIndex
from effdet_jax.evaluation.coco_metrics import METRIC_NAMES, CocoEvaluator

H, W = 80, 100  # image height, width (pixels)
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]


def _ann(i, bbox, cat=1, crowd=0, **extra):
    ann = {"id": i, "image_id": 7, "category_id": cat, "iscrowd": crowd, **extra}
    if bbox is not None:
        ann["bbox"] = bbox
    if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int) for v in bbox):
        ann.setdefault("area", bbox[2] * bbox[3])
    return ann


# (annotation, what the rule does to it); bboxes are xywh pixels.
CASES = [
    (_ann(1, [10, 10, 30, 20], area=555.5), "kept"),  # json area kept, not recomputed
    (_ann(2, [50, 30, 20, 20], cat=2), "kept"),
    (_ann(3, [0, 0, 40, 40], crowd=1), "kept"),  # crowd stays, as crowd
    (_ann(4, [math.nan, 1, 2, 3]), "boxes_nan_dropped"),
    (_ann(5, [1, 1, math.inf, 3]), "boxes_nan_dropped"),
    (_ann(6, ["a", 1, 2, 3]), "boxes_nan_dropped"),
    (_ann(7, [1, 2, 3]), "boxes_nan_dropped"),
    (_ann(8, None), "boxes_nan_dropped"),
    (_ann(9, [60, 70, -20, -30]), "boxes_inverted_fixed"),  # -> [40, 40, 20, 30]
    (_ann(10, [90, 70, 30, 30], cat=2), "boxes_clipped"),  # -> [90, 70, 10, 10]
    (_ann(11, [120, 10, 10, 10]), "boxes_degenerate_dropped"),  # outside: zero area clipped
    (_ann(12, [10, 10, 0, 5]), "boxes_degenerate_dropped"),
    (_ann(13, [10, 10, 10, 10], cat=99), "boxes_unknown_class_dropped"),
    (_ann(14, [10, 10, 10, 10], cat="x"), "boxes_unknown_class_dropped"),
]
FIXED = {9: [40.0, 40.0, 20.0, 30.0], 10: [90.0, 70.0, 10.0, 10.0]}


def _dataset(annotations):
    return {"images": [{"id": 7, "file_name": "a.jpg", "height": H, "width": W}],
            "categories": CATEGORIES, "annotations": annotations}


def _hand_cleaned():
    anns = []
    for ann, what in CASES:
        if what == "kept":
            anns.append(dict(ann))
        elif ann["id"] in FIXED:
            bbox = FIXED[ann["id"]]
            anns.append(dict(ann, bbox=bbox, area=bbox[2] * bbox[3]))
    return _dataset(anns)


# Detections (xywh pixels, category id, score): hits on 1, 2, 9 and 10, one on the crowd box and
# a false positive.
DETECTIONS = [([10, 10, 30, 20], 1, 0.9), ([51, 30, 20, 19], 2, 0.8), ([40, 41, 20, 29], 1, 0.7),
              ([90, 70, 10, 10], 2, 0.6), ([0, 0, 40, 40], 1, 0.5), ([5, 60, 10, 10], 1, 0.4)]


def _reference(dataset):
    """pycocotools alone on ``dataset`` with ``DETECTIONS``."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes([{"image_id": 7, "bbox": [float(v) for v in b], "category_id": c,
                          "score": s} for b, c, s in DETECTIONS])
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return dict(zip(METRIC_NAMES, (float(v) for v in ev.stats), strict=True))


def test_malformed_json_scores_like_the_hand_cleaned_one(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_dataset([a for a, _ in CASES])))  # NaN/Infinity as json allows
    label_map = from_categories(CATEGORIES)
    ev = CocoEvaluator(label_map, str(path))
    boxes = np.array([[[y, x, y + h, x + w] for (x, y, w, h), _, _ in DETECTIONS]], np.float64)
    ev.add_detections(np.array([7]), boxes, np.array([[s for *_, s in DETECTIONS]]),
                      np.array([[label_map.label_of_category(c) for _, c, _ in DETECTIONS]]),
                      np.array([len(DETECTIONS)]))
    metrics = ev.evaluate()
    expected = _reference(_hand_cleaned())
    assert expected["AP"] > 0
    for k in METRIC_NAMES:
        assert metrics[k] == pytest.approx(expected[k], abs=1e-9), k
    report = ev.gt_report
    assert report.counts == {"boxes_nan_dropped": 5, "boxes_unknown_class_dropped": 2,
                             "boxes_inverted_fixed": 1, "boxes_clipped": 1,
                             "boxes_degenerate_dropped": 2}
    assert report.examples["boxes_nan_dropped"] == [4, 5, 6, 7, 8]
    assert report.examples["boxes_degenerate_dropped"] == [11, 12]
    assert report.examples["boxes_unknown_class_dropped"] == [13, 14]
    assert (report.num_annotations, report.num_kept) == (len(CASES), 5)
    assert "boxes_nan_dropped=5 (e.g. annotation ids [4, 5, 6, 7, 8])" in report.format()


def test_sanitized_ground_truth_is_the_hand_cleaned_one():
    cleaned, _ = sanitize_coco_dataset(_dataset([a for a, _ in CASES]), {1, 2})
    assert cleaned == _hand_cleaned()


def test_a_clean_json_passes_through_unchanged():
    clean = _hand_cleaned()
    clean["annotations"] = [a for a in clean["annotations"] if a["id"] not in FIXED]
    clean["info"] = {"description": "kept"}
    before = json.dumps(clean)
    cleaned, report = sanitize_coco_dataset(clean, {1, 2})
    assert json.dumps(cleaned) == before and json.dumps(clean) == before
    assert report.num_kept == report.num_annotations == 3 and not any(report.counts.values())


def test_training_and_evaluation_apply_the_same_rule(tmp_path):
    """The training path (the coco_json source's index, then the in-graph rule on normalised
    boxes) keeps and fixes what evaluation does."""
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_dataset([a for a, _ in CASES])))
    index = CocoJsonIndex(str(path), str(tmp_path))
    cleaned, report = sanitize_coco_dataset(json.loads(path.read_text()), {1, 2})
    x, y, w, h = index.boxes[0].T
    boxes = np.stack([y / H, x / W, (y + h) / H, (x + w) / W], axis=1).astype(np.float32)
    lookup = index.label_map.category_lookup()
    classes = np.array([lookup.get(int(c), -1) for c in index.category_ids[0]], np.int32)
    crowd = index.is_crowd[0]
    b, _, _, counts = sanitize_boxes(tf.constant(boxes), tf.constant(classes), tf.constant(crowd), 2)
    assert {k: int(v) for k, v in counts.items()} == report.counts
    expected = np.array([[y / H, x / W, (y + h) / H, (x + w) / W]
                         for x, y, w, h in (a["bbox"] for a in cleaned["annotations"])])
    np.testing.assert_allclose(b.numpy(), expected, atol=1e-6)


def test_a_fixed_box_keeps_the_area_of_its_segment():
    seg = [[95.0, 70.0, 99.0, 70.0, 99.0, 79.0]]
    ds = _dataset([_ann(1, [90, 70, 30, 30], area=18.0, segmentation=seg),
                   _ann(2, [90, 70, 30, 30], area=900)])
    cleaned, report = sanitize_coco_dataset(ds, {1, 2})
    a, b = cleaned["annotations"]
    assert a["bbox"] == b["bbox"] == [90.0, 70.0, 10.0, 10.0]
    assert (a["area"], b["area"]) == (18.0, 100.0) and report.counts["boxes_clipped"] == 2


def test_missing_fields_pycocotools_needs_are_filled():
    ds = _dataset([{"image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4]},
                   {"id": 5, "image_id": 7, "category_id": 2, "bbox": [1, 2, 3, 4],
                    "area": "big"},
                   {"id": 6, "image_id": 999, "category_id": 2, "bbox": [1, 2, 3, 4]}])
    del ds["images"][0]["width"]  # no clipping on x without a width
    cleaned, report = sanitize_coco_dataset(ds, {1, 2})
    a, b = cleaned["annotations"]
    assert (a["id"], a["iscrowd"], a["area"]) == (6, 0, 12.0)
    assert b["area"] == 12.0 and report.num_kept == 2


def test_the_files_size_wins_over_the_jsons_and_unknown_images_are_counted():
    ann = _ann(1, [60, 50, 60, 40])  # x1 = 120: outside the json's 80x100 (height, width)
    data = _dataset([ann, {**_ann(2, [0, 0, 5, 5]), "image_id": 8}, _ann(3, [1, 1, 0, 0])])
    out, report = sanitize_coco_dataset(data, {1})
    assert out["annotations"][0]["bbox"] == [60.0, 50.0, 40.0, 30.0]  # clipped to 80x100
    # The file is 200x200 (height, width): the box is inside it and stays as it is.
    out, report = sanitize_coco_dataset(data, {1}, image_sizes={7: (200, 200)})
    assert out["annotations"][0]["bbox"] == [60, 50, 60, 40]
    assert report.counts["boxes_clipped"] == 0
    assert (report.num_unknown_image, report.unknown_image_examples) == (1, [2])
    assert report.num_dropped == 2  # the unknown image's and the zero-area one
    assert report.first_flagged == (1, "boxes_unknown_image_dropped")  # before ann 3 (pos. 2)
    assert "boxes_unknown_image_dropped=1 (e.g. annotation ids [2])" in report.format()
