import json

import numpy as np
import pytest

from effdet_jax.data.config import default_data_config
from effdet_jax.data.label_map import LabelMap, coco_label_map
from effdet_jax.data.pipeline import make_eval_pipeline
from effdet_jax.evaluation import CocoEvaluator
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET


def test_perfect_detections_on_shapes_give_ap_1():
    c = default_data_config()
    c.shapes.num_eval = 6
    c.shapes.image_size = 96
    pipe = make_eval_pipeline(c, 96, 4, normalization=IMAGENET)
    ev = CocoEvaluator(pipe.label_map, pipe.gt_annotations, per_class=True)
    for batch in pipe:
        classes = batch["classes"]
        valid = (classes >= 0).sum(1)
        order = np.argsort(classes < 0, axis=1, kind="stable")  # valid rows first
        boxes = np.take_along_axis(batch["boxes"], order[..., None], 1)
        cls = np.take_along_axis(classes, order, 1)
        ev.add_batch(batch, (boxes, np.ones(cls.shape), cls, valid))
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert m["ARmax100"] == pytest.approx(1.0)
    assert all(m[f"AP/{n}"] == pytest.approx(1.0) for n in pipe.label_map.names)


def _hand_made(ev_kwargs=None):
    """One image, one class, 2 gt; detections: hit (0.9), miss (0.8), hit (0.7).

    PR points: (R .5, P 1), (R .5, P .5), (R 1, P 2/3). COCO's interpolated precision is 1 for
    the 51 recall thresholds 0.00..0.50 and 2/3 for the 50 thresholds 0.51..1.00, so
    AP = (51 + 50 * 2/3) / 101 at every IoU threshold (the hits are exact).
    """
    gt = np.array([[[10, 10, 60, 60], [100, 100, 160, 150]]], np.float32)
    dets = np.array([[[10, 10, 60, 60], [200, 200, 240, 240], [100, 100, 160, 150]]], np.float32)
    return gt, dets, np.array([[0.9, 0.8, 0.7]]), (51 + 50 * 2 / 3) / 101


def test_known_value_on_a_hand_made_case():
    gt, dets, scores, expected = _hand_made()
    ev = CocoEvaluator(LabelMap((5,), ("thing",)))
    ev.add_groundtruth(np.array([1]), gt, np.array([[0, 0]]))
    ev.add_detections(np.array([1]), dets, scores, np.zeros((1, 3), int), np.array([3]))
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(expected, abs=1e-6)
    assert m["AP50"] == pytest.approx(expected, abs=1e-6)
    assert m["AP75"] == pytest.approx(expected, abs=1e-6)
    assert m["ARmax1"] == pytest.approx(0.5) and m["ARmax10"] == pytest.approx(1.0)
    # Only the top-ranked detection counts for AR@1; every box is "large" (> 96^2 px)? no:
    # 50x50 and 60x50 are medium (32^2..96^2), so APs is -1 (no small gt) and APl is -1.
    assert m["APs"] == -1 and m["APl"] == -1 and m["APm"] == pytest.approx(expected, abs=1e-6)


def test_json_ground_truth_and_results_file(tmp_path):
    gt, dets, scores, expected = _hand_made()
    lm = coco_label_map("coco90")  # label = category_id - 1
    ann = {"images": [{"id": 42, "height": 300, "width": 300}],
           "categories": lm.categories_json(),
           "annotations": [{"id": i + 1, "image_id": 42, "category_id": 18, "iscrowd": 0,
                            "bbox": [float(b[1]), float(b[0]), float(b[3] - b[1]),
                                     float(b[2] - b[0])],
                            "area": float((b[3] - b[1]) * (b[2] - b[0]))}
                           for i, b in enumerate(gt[0])]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ann))
    ev = CocoEvaluator(lm, str(path))
    ev.add_detections(np.array([42, -1]), np.concatenate([dets, dets]),
                      np.concatenate([scores, scores]), np.full((2, 3), 17), np.array([3, 3]))
    assert ev.evaluate()["AP"] == pytest.approx(expected, abs=1e-6)
    out = tmp_path / "results.json"
    ev.write_results(str(out))
    res = json.loads(out.read_text())
    assert len(res) == 3 and {r["category_id"] for r in res} == {18}  # dog, id 18
    assert res[0]["bbox"] == [10.0, 10.0, 50.0, 50.0] and res[0]["image_id"] == 42


def test_crowd_ground_truth_is_ignored_not_missed():
    lm = LabelMap((1, 2), ("a", "b"))
    ev = CocoEvaluator(lm)
    gt = np.array([[[0, 0, 50, 50], [100, 100, 200, 200]]], np.float32)
    # The second gt is crowd of class 1; a detection on it must not count as a false positive.
    ev.add_groundtruth(np.array([3]), gt, np.array([[0, -2]]), np.array([[-1, 1]]))
    ev.add_detections(np.array([3]), gt, np.array([[0.9, 0.95]]), np.array([[0, 1]]),
                      np.array([2]))
    m = ev.evaluate()
    assert m["AP"] == pytest.approx(1.0)  # class 1 has no non-crowd gt: excluded (-1)
