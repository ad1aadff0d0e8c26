"""Evaluation against a COCO json is the official evaluation: the json's ``area`` (not the box's)
decides small / medium / large, crowd boxes are ignored as pycocotools ignores them, and our
numbers (summary and per class) equal pycocotools run directly on the same json and results.
Detections go back to original-image pixels, COCO category ids and the submission format."""

import contextlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from effdet_jax.data.config import default_data_config
from effdet_jax.data.label_map import from_categories
from effdet_jax.data.pipeline import make_eval_pipeline
from effdet_jax.evaluation import METRIC_NAMES, CocoEvaluator, report
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

# Non-contiguous ids, so a wrong label <-> category map scores nothing.
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 7, "name": "train"}, {"id": 18, "name": "dog"}]
IMAGES = [{"id": 397133, "file_name": "a.jpg", "height": 427, "width": 640},
          {"id": 37777, "file_name": "b.jpg", "height": 230, "width": 352}]


def _ann(i, image_id, cat, xywh, area, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": xywh, "area": area,
            "iscrowd": crowd}


# Segment areas differ from box areas, as in COCO: ann 2's box is 40x40 = 1600 px (medium by its
# box) but its area is 700 (small); ann 5's box is 100x100 (large by box), area 8000 (medium).
ANNOTATIONS = [
    _ann(1, 397133, 1, [10.0, 20.0, 20.0, 30.0], 480.0),            # small
    _ann(2, 397133, 1, [100.0, 50.0, 40.0, 40.0], 700.0),           # small by area
    _ann(3, 397133, 7, [200.0, 100.0, 300.0, 250.0], 60000.0),      # large
    _ann(4, 397133, 18, [50.0, 300.0, 60.0, 70.0], 3500.0),         # medium
    _ann(5, 37777, 18, [20.0, 20.0, 100.0, 100.0], 8000.0),         # medium by area
    _ann(6, 37777, 1, [150.0, 10.0, 180.0, 200.0], 20000.0, crowd=1),  # crowd
    _ann(7, 37777, 1, [160.0, 60.0, 30.0, 60.0], 1500.0),           # medium, inside the crowd
    _ann(8, 37777, 7, [10.0, 140.0, 120.0, 80.0], 9000.0),          # large by area
]

# The results (COCO submission format), written by hand: hits with some jitter, duplicates, a
# miss, a wrong class, and detections inside the crowd region (ignored, not false positives).
RESULTS = [
    {"image_id": 397133, "category_id": 1, "bbox": [11.0, 21.0, 19.0, 29.0], "score": 0.9},
    {"image_id": 397133, "category_id": 1, "bbox": [102.0, 52.0, 36.0, 40.0], "score": 0.6},
    {"image_id": 397133, "category_id": 1, "bbox": [400.0, 300.0, 30.0, 30.0], "score": 0.8},
    {"image_id": 397133, "category_id": 7, "bbox": [210.0, 110.0, 280.0, 240.0], "score": 0.95},
    {"image_id": 397133, "category_id": 7, "bbox": [205.0, 100.0, 290.0, 250.0], "score": 0.5},
    {"image_id": 397133, "category_id": 18, "bbox": [50.0, 300.0, 60.0, 70.0], "score": 0.7},
    {"image_id": 397133, "category_id": 18, "bbox": [10.0, 20.0, 20.0, 30.0], "score": 0.75},
    {"image_id": 37777, "category_id": 18, "bbox": [25.0, 15.0, 90.0, 100.0], "score": 0.85},
    {"image_id": 37777, "category_id": 1, "bbox": [155.0, 20.0, 170.0, 190.0], "score": 0.99},
    {"image_id": 37777, "category_id": 1, "bbox": [200.0, 150.0, 20.0, 20.0], "score": 0.97},
    {"image_id": 37777, "category_id": 1, "bbox": [161.0, 62.0, 29.0, 57.0], "score": 0.4},
    {"image_id": 37777, "category_id": 7, "bbox": [12.0, 145.0, 110.0, 75.0], "score": 0.3},
]


def _write_json(tmp_path, with_annotations=True):
    dataset = {"images": IMAGES, "categories": CATEGORIES}
    if with_annotations:
        dataset["annotations"] = ANNOTATIONS
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(dataset))
    return str(path)


def _feed_results(evaluator: CocoEvaluator, results: list[dict]) -> None:
    """``results`` as the trainer feeds them: per image, yxyx boxes and 0-based labels."""
    label_map = evaluator.label_map
    for image in IMAGES:
        rows = [r for r in results if r["image_id"] == image["id"]]
        xywh = np.array([r["bbox"] for r in rows], np.float64)
        yxyx = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3],
                         xywh[:, 0] + xywh[:, 2]], -1)
        labels = [label_map.label_of_category(r["category_id"]) for r in rows]
        evaluator.add_detections(
            np.array([image["id"]]), yxyx[None], np.array([[r["score"] for r in rows]]),
            np.array([labels]), np.array([len(rows)]),
            image_hw=np.array([[image["height"], image["width"]]]))


def _pycocotools(gt_path: str, results: list[dict], cat_ids=None) -> np.ndarray:
    """``COCOeval.stats`` of pycocotools on the json and results, nothing of ours involved."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_official_metric_equals_pycocotools_on_the_same_json_and_results(tmp_path):
    gt_path = _write_json(tmp_path)
    evaluator = CocoEvaluator(from_categories(CATEGORIES, "coco90"), gt_path, per_class=True)
    _feed_results(evaluator, RESULTS)
    metrics = evaluator.evaluate()

    expected = _pycocotools(gt_path, RESULTS)
    # Every area range has ground truth, so none of the twelve numbers is COCO's -1.
    assert min(expected) > 0 and expected[0] < 1
    np.testing.assert_allclose([metrics[k] for k in METRIC_NAMES], expected, atol=1e-12)

    # Per class: pycocotools restricted to that one category is an independent computation of
    # the same numbers our table reads from the shared precision array.
    assert [r.category_id for r in evaluator.class_rows] == [1, 7, 18]
    for row in evaluator.class_rows:
        stats = _pycocotools(gt_path, RESULTS, cat_ids=[row.category_id])
        ours = [row.ap, row.ap50, row.ap75, row.aps, row.apm, row.apl]
        np.testing.assert_allclose(ours, stats[:6], atol=1e-12, err_msg=row.name)
        assert metrics[f"AP/{row.name}"] == row.ap
    assert {r.name: r.num_gt for r in evaluator.class_rows} == {"person": 3, "train": 2, "dog": 2}

    # The results file is the submission format and holds exactly the hand-made results.
    out = tmp_path / "results.json"
    evaluator.write_results(str(out))
    written = json.loads(out.read_text())
    assert all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in written)
    key = lambda r: (r["image_id"], r["category_id"], r["score"])  # noqa: E731
    for ours, theirs in zip(sorted(written, key=key), sorted(RESULTS, key=key), strict=True):
        assert key(ours) == key(theirs)
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=1e-3)


def test_detections_in_slots_without_a_category_are_left_out_and_counted(tmp_path):
    """automl's 90-slot head also scores COCO's unused ids (12, 26, ...): no category, no entry."""
    evaluator = CocoEvaluator(from_categories(CATEGORIES, "coco90"), _write_json(tmp_path))
    boxes = np.array([[[10, 10, 40, 40], [10, 10, 40, 40], [0, 0, 20, 20]]], np.float32)
    evaluator.add_detections(np.array([397133]), boxes, np.array([[0.9, 0.8, 0.7]]),
                             np.array([[0, 11, 25]]), np.array([3]))  # ids 1, 12, 26
    assert [r["category_id"] for r in evaluator.detections] == [1]
    assert evaluator.num_without_category == 2
    block = report.format_report(1, evaluator, {})
    assert "2 detections in head slots without a category" in block


def test_json_areas_decide_the_size_ranges_not_the_boxes(tmp_path):
    """The same boxes with box areas (what a rebuilt ground truth has) give other APs/APm/APl:
    the json path really reads the json's areas."""
    gt_path = _write_json(tmp_path)
    evaluator = CocoEvaluator(from_categories(CATEGORIES), gt_path)
    _feed_results(evaluator, RESULTS)
    official = evaluator.evaluate()
    boxes_only = json.loads(open(gt_path).read())
    for ann in boxes_only["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    rebuilt = tmp_path / "box_areas.json"
    rebuilt.write_text(json.dumps(boxes_only))
    by_box = _pycocotools(str(rebuilt), RESULTS)
    assert official["AP"] == pytest.approx(by_box[0])  # 'all' ignores areas
    assert (official["APs"], official["APm"], official["APl"]) != tuple(by_box[3:6])


def test_image_info_json_writes_results_and_skips_metrics(tmp_path, caplog):
    """test-dev: a json with images but no annotations list. The results file is written, the
    metrics are skipped and the log says so."""
    info_path = _write_json(tmp_path, with_annotations=False)
    evaluator = CocoEvaluator(from_categories(CATEGORIES, "coco90"), info_path, per_class=True)
    _feed_results(evaluator, RESULTS)
    with caplog.at_level(logging.INFO):
        metrics = report.finish_evaluation(evaluator, 7, str(tmp_path / "eval"), "test-dev")
    assert metrics == {}
    assert "no 'annotations' list" in evaluator.skipped
    assert "metrics skipped" in caplog.text and "no metrics:" in caplog.text
    written = json.loads((tmp_path / "eval" / "detections_test-dev_step7.json").read_text())
    assert len(written) == len(RESULTS)
    assert {r["image_id"] for r in written} == {im["id"] for im in IMAGES}
    saved = json.loads((tmp_path / "eval" / "metrics_test-dev_step7.json").read_text())
    assert saved["metrics"] == {} and saved["skipped"] == evaluator.skipped


def test_report_block_and_per_class_table(tmp_path, caplog):
    gt_path = _write_json(tmp_path)
    evaluator = CocoEvaluator(from_categories(CATEGORIES, "coco90"), gt_path)
    _feed_results(evaluator, RESULTS)
    with caplog.at_level(logging.INFO):
        metrics = report.finish_evaluation(evaluator, 12, str(tmp_path / "eval"), "val")
    block = report.format_report(12, evaluator, metrics)
    assert block in caplog.text
    lines = block.splitlines()
    assert f"2 images, {len(RESULTS)} detections, ground truth: {gt_path}" in lines[0]
    assert lines[1].split()[:2] == ["AP", f"{metrics['AP']:.3f}"]
    assert lines[2].split()[:2] == ["APs", f"{metrics['APs']:.3f}"]
    assert lines[6].split()[:4] == ["id", "class", "gt", "AP"]
    table = {line.split()[1]: line.split() for line in lines[7:]}
    assert set(table) == {"person", "train", "dog"}
    dog = next(r for r in evaluator.class_rows if r.name == "dog")
    assert table["dog"][0] == "18" and table["dog"][2] == "2"
    assert table["dog"][3] == f"{dog.ap:.3f}" and table["dog"][4] == f"{dog.ap50:.3f}"
    saved = json.loads((tmp_path / "eval" / "metrics_val_step12.json").read_text())
    assert saved["metrics"]["AP"] == metrics["AP"]
    assert [r["name"] for r in saved["per_class"]] == ["person", "train", "dog"]


def test_perfect_detections_map_back_to_the_json_boxes(tmp_path):
    """Through the eval pipeline (resize to 64 px, pad) and back: the ground truth of each image,
    fed as detections in network pixels, comes out in the results file as the json's xywh
    pixel boxes (to within one network pixel, the pipeline's truncation to whole pixels) and
    scores AP50 = 1 against the json; a box reaching into the padding ends at the image edge."""
    rng = np.random.default_rng(0)
    sizes = {5: (150, 100), 9: (90, 200), 11: (64, 64)}  # id: (height, width), not square
    images, annotations = [], []
    (tmp_path / "img").mkdir()
    for image_id, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
            tmp_path / "img" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for k, cat in enumerate((3, 8)):
            bw, bh = w * 0.4, h * 0.45
            x, y = k * w * 0.5, k * h * 0.5
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": cat, "bbox": [x, y, bw, bh],
                                "area": bw * bh, "iscrowd": 0})
    categories = [{"id": 3, "name": "three"}, {"id": 8, "name": "eight"}]
    gt_path = tmp_path / "instances.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": categories}))
    c = default_data_config()
    c.source = "coco_json"
    c.train_annotations = c.eval_annotations = str(gt_path)
    c.train_images = c.eval_images = str(tmp_path / "img")
    pipe = make_eval_pipeline(c, 64, 4, normalization=IMAGENET)
    evaluator = CocoEvaluator(pipe.label_map, pipe.gt_annotations)
    for batch in pipe:
        boxes, classes = batch["boxes"].copy(), batch["classes"].copy()
        valid = (classes >= 0).sum(1)
        # One more detection per image: the whole 64-px input, padding included.
        boxes[:, 2] = [0, 0, 64, 64]
        classes[:, 2] = 0
        scores = np.ones(classes.shape)
        scores[:, 2] = 0.5  # a false positive, ranked below every hit
        evaluator.add_batch(batch, (boxes, scores, classes, valid + 1))
    assert evaluator.evaluate()["AP50"] == pytest.approx(1.0)
    evaluator.write_results(str(tmp_path / "results.json"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["image_id"] for r in results} == set(sizes)
    assert {r["category_id"] for r in results} == {3, 8}
    for ann in annotations:
        h, w = sizes[ann["image_id"]]
        tolerance = max(h, w) / 64  # one network pixel in original pixels
        match = [r for r in results if r["image_id"] == ann["image_id"]
                 and r["category_id"] == ann["category_id"]
                 and np.allclose(r["bbox"], ann["bbox"], atol=tolerance)]
        assert match, (ann, [r for r in results if r["image_id"] == ann["image_id"]])
    for image_id, (h, w) in sizes.items():
        whole = [r["bbox"] for r in results if r["image_id"] == image_id
                 and r["bbox"][:2] == [0.0, 0.0] and r["bbox"][2] > 0.95 * w]
        assert whole == [[0.0, 0.0, float(w), float(h)]], (image_id, whole)
