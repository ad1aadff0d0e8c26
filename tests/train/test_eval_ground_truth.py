"""Evaluation as a user runs it: against the official json when one is given, a COCO results file
for every evaluation in original pixels and dataset category ids, and test-dev (an image-info
json, no ground truth) writing the file and skipping the metrics.

The tfds runs use ``tfds.testing.mock_data``, which patches tfds in this process only, so they call
the trainer in-process (with the reduced ``configs/d0.py`` of ``test_coco_recipe``); the COCO-json
run is a ``main.py`` subprocess.
"""

import json
import logging
import subprocess

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from test_coco_recipe import _small_d0
from train_helpers import ROOT, main_command, subprocess_env

from effdet_jax.data.label_map import COCO_CATEGORY_IDS
from effdet_jax.evaluation import coco_metrics

SUBMISSION_KEYS = {"image_id", "category_id", "bbox", "score"}


def _mock_split_json(builder, split: str, path, with_annotations: bool, keep=None) -> dict:
    """A COCO json of the mock ``split`` (image ids, sizes and boxes of its examples) with a
    made-up ``area`` per annotation (7 + k px: every box is 'small', which boxes rebuilt from
    the examples would not be). ``keep``: only the first ``keep`` images."""
    images, annotations = [], []
    for ex in list(builder.as_dataset(split=split))[:keep]:
        h, w = (int(v) for v in ex["image"].shape[:2])
        image_id = int(ex["image/id"])
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": h, "width": w})
        obj = ex["objects"]
        n = min(len(obj["bbox"]), len(obj["label"]), len(obj["is_crowd"]))
        for (y0, x0, y1, x1), label, crowd in zip(obj["bbox"].numpy()[:n],
                                                  obj["label"].numpy()[:n],
                                                  obj["is_crowd"].numpy()[:n], strict=True):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": COCO_CATEGORY_IDS[int(label)],
                "bbox": [float(x0 * w), float(y0 * h), float((x1 - x0) * w), float((y1 - y0) * h)],
                "area": 7.0 + len(annotations), "iscrowd": int(crowd)})
    dataset = {"images": images,
               "categories": [{"id": c, "name": str(c)} for c in COCO_CATEGORY_IDS]}
    if with_annotations:
        dataset["annotations"] = annotations
    path.write_text(json.dumps(dataset))
    return dataset


def _check_submission(results: list[dict], images: list[dict], category_ids) -> None:
    """Submission format, known image and category ids, boxes inside the original image."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in images}
    assert results
    for r in results:
        assert set(r) == SUBMISSION_KEYS, r
        assert r["image_id"] in sizes and r["category_id"] in category_ids, r
        h, w = sizes[r["image_id"]]
        x, y, bw, bh = r["bbox"]
        assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0, r
        assert x + bw <= w + 1e-3 and y + bh <= h + 1e-3, (r, h, w)


def test_tfds_eval_uses_the_official_json_and_test_dev_skips_metrics(tmp_path, monkeypatch,
                                                                     caplog):
    from effdet_jax.train import trainer

    config = _small_d0()
    config.data.tfds_data_dir = str(tmp_path / "tensorflow_datasets")
    val_json, info_json = tmp_path / "instances_val2017.json", tmp_path / "image_info_test-dev2017.json"
    config.data.eval_annotations = str(val_json)
    seen = {}
    evaluate = coco_metrics.CocoEvaluator.evaluate

    def recording_evaluate(self):
        seen["gt_path"] = self.gt_annotations
        seen["gt"] = self._ground_truth().dataset
        return evaluate(self)

    monkeypatch.setattr(coco_metrics.CocoEvaluator, "evaluate", recording_evaluate)
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=6):
        builder = tfds.builder("coco/2017", data_dir=config.data.tfds_data_dir)
        official = _mock_split_json(builder, "validation", val_json, with_annotations=True)
        metrics = trainer.train_and_evaluate(config, str(workdir))

        # test-dev: the first 3 images of the mock test split, listed in an image-info json.
        # (The source counts the listed images with tfds' PartialDecoding, reading only ids; the
        # mock draws other random examples for a partial decode, so here that count, and the
        # warning about unlisted images, do not describe the mock split: this test checks which
        # images are evaluated and written, tests/data/sources/test_tfds_eval_files.py the filter.)
        test_dev = _mock_split_json(builder, "test", info_json, with_annotations=False, keep=3)
        config.data.eval_split = "test"
        config.data.eval_annotations = ""
        config.data.eval_image_info = str(info_json)
        with caplog.at_level(logging.INFO):
            test_metrics = trainer.evaluate(config, str(workdir))

    # The official json is the ground truth: its areas (all 'small') decide the size ranges.
    assert np.isfinite(metrics["AP"]) and metrics["APs"] >= 0
    assert metrics["APm"] == -1 and metrics["APl"] == -1
    results = json.loads((workdir / "eval" / "detections_validation_step2.json").read_text())
    _check_submission(results, official["images"], set(COCO_CATEGORY_IDS))
    saved = json.loads((workdir / "eval" / "metrics_validation_step2.json").read_text())
    assert saved["ground_truth"] == str(val_json) and saved["metrics"]["AP"] == metrics["AP"]
    assert len(saved["per_class"]) == 80

    # test-dev: no ground truth, the results file of the listed images, metrics skipped.
    assert test_metrics == {}
    assert seen["gt_path"] == str(info_json) and "annotations" not in json.loads(
        info_json.read_text())
    listed = {im["id"] for im in test_dev["images"]}
    assert "evaluation at step 2: 3 images" in caplog.text
    assert "metrics skipped" in caplog.text and "no 'annotations' list" in caplog.text
    test_dev_file = workdir / "eval" / "detections_test-image_info_test-dev2017_step2.json"
    results = json.loads(test_dev_file.read_text())
    assert {r["image_id"] for r in results} == listed
    _check_submission(results, test_dev["images"], set(COCO_CATEGORY_IDS))


def test_main_writes_the_results_file_in_original_pixels(tmp_path):
    """``main.py`` on a COCO-json folder (non-contiguous category ids, images larger than the
    64-px input and not square): the results file of the evaluation maps back to the json's image
    ids, category ids and original pixels, and the log shows the AP block and per-class table."""
    rng = np.random.default_rng(0)
    # Four categories (tiny's head size, so its compiled step is shared); "toothbrush" has no box.
    categories = [{"id": 3, "name": "car"}, {"id": 17, "name": "cat"}, {"id": 44, "name": "bottle"},
                  {"id": 90, "name": "toothbrush"}]
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images, annotations = [], []
    for i, (h, w) in enumerate([(120, 200), (240, 90), (150, 150), (100, 260)] * 2):
        name = f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": 1000 + 7 * i, "file_name": name, "height": h, "width": w})
        for k in range(2):
            bw, bh = w * 0.3, h * 0.3
            annotations.append({"id": len(annotations) + 1, "image_id": 1000 + 7 * i,
                                "category_id": categories[(i + k) % 3]["id"], "iscrowd": 0,
                                "bbox": [k * w * 0.5, k * h * 0.5, bw, bh], "area": bw * bh})
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories}))
    workdir = tmp_path / "run"
    cmd = main_command(
        workdir,
        "--config.data.source=coco_json",
        f"--config.data.train_annotations={ann_path}", f"--config.data.train_images={images_dir}",
        f"--config.data.eval_annotations={ann_path}", f"--config.data.eval_images={images_dir}",
        "--config.train.total_steps=2",
        "--config.eval.num_summary_images=0",
    )
    cmd[cmd.index("--mode=train")] = "--mode=train_and_eval"
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    results = json.loads((workdir / "eval" / "detections_instances_step2.json").read_text())
    _check_submission(results, images, {3, 17, 44, 90})
    assert {r["image_id"] for r in results} <= {im["id"] for im in images}
    # De-scaled: the network sees 64 px, the boxes are in the originals' 90..260 px.
    assert max(r["bbox"][0] + r["bbox"][2] for r in results) > 64
    assert f"evaluation at step 2: 8 images, {len(results)} detections, ground truth: " \
           f"{ann_path}" in log, log[-4000:]
    table = log[log.index("per-class AP"):].splitlines()[1:6]
    assert table[0].split()[:4] == ["id", "class", "gt", "AP"], table
    assert [line.split()[:3] for line in table[1:]] == [
        ["3", "car", "5"], ["17", "cat", "6"], ["44", "bottle", "5"], ["90", "toothbrush", "0"]]
    assert table[4].split()[3:] == ["-"] * 6  # no ground truth: no AP
