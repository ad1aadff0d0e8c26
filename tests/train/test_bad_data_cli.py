"""``main.py --mode=train_and_eval`` on a COCO-json folder whose train and eval annotations hold
every kind of malformed box: the run trains, evaluates (an AP is logged), exits 0, and the log
names how many ground-truth boxes the box rule dropped or fixed, per rule, and the unreadable
eval image."""

import json
import math
import subprocess

import numpy as np
from PIL import Image
from train_helpers import ROOT, main_command, subprocess_env

H, W = 48, 64  # every image's height and width (pixels)
CATEGORIES = [{"id": i, "name": n} for i, n in enumerate(("a", "b", "c", "d"), start=1)]


def _split(folder, n_images: int, broken: bool) -> tuple[str, str]:
    """``n_images`` JPEGs (plus a broken one if asked) and a json with every malformed case on
    its first image; returns (json path, image folder). Boxes are xywh pixels."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    images, anns = [], []
    for i in range(n_images):
        name = f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": H, "width": W})
        anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1 + i % 4, "iscrowd": 0,
                     "bbox": [8, 6, 30, 20], "area": 600})
    if broken:
        (images_dir / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        images.append({"id": 99, "file_name": "broken.jpg", "height": H, "width": W})
    bad = [
        [math.nan, 1, 2, 3], [1, 1, math.inf, 3], ["x", 1, 2, 3], [1, 2, 3], None,  # malformed
        [50, 40, -20, -10],  # inverted -> fixed
        [-5, 30, 20, 30],  # out of the image -> clipped
        [100, 10, 10, 10],  # outside: zero area after clipping -> dropped
    ]
    for k, bbox in enumerate(bad):
        ann = {"id": 1 + k, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 1.0}
        if bbox is not None:
            ann["bbox"] = bbox
        anns.append(ann)
    anns.append({"id": 20, "image_id": 1, "category_id": 42, "iscrowd": 0,  # unknown category
                 "bbox": [4, 4, 10, 10], "area": 100})
    anns.append({"id": 21, "image_id": 2, "category_id": 3, "iscrowd": 1,  # crowd: kept
                 "bbox": [0, 0, 30, 30], "area": 900})
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": CATEGORIES}))
    return str(path), str(images_dir)


def test_train_and_eval_survives_malformed_annotations(tmp_path):
    train_json, train_images = _split(tmp_path / "train", 8, broken=False)
    eval_json, eval_images = _split(tmp_path / "eval", 3, broken=True)
    cmd = main_command(
        tmp_path / "run",
        "--config.data.source=coco_json",
        f"--config.data.train_annotations={train_json}",
        f"--config.data.train_images={train_images}",
        f"--config.data.eval_annotations={eval_json}",
        f"--config.data.eval_images={eval_images}",
        "--config.train.total_steps=2",
        "--config.eval.num_summary_images=0",
    )
    cmd[cmd.index("--mode=train")] = "--mode=train_and_eval"
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "evaluation at step 2: 3 images" in log and "\n  AP  " in log, log[-4000:]
    # The eval ground truth: 5 malformed, 1 unknown category, 1 zero area after clipping, out of
    # 3 good + 1 crowd + 9 bad = 13 annotations; the inverted and the clipped ones are fixed.
    assert "7 ground-truth boxes dropped [6 of 13 ground-truth boxes kept (7 dropped)" in log
    for rule in ("boxes_nan_dropped=5 (e.g. annotation ids [1, 2, 3, 4, 5])",
                 "boxes_unknown_class_dropped=1 (e.g. annotation ids [20])",
                 "boxes_inverted_fixed=1 (e.g. annotation ids [6])",
                 "boxes_clipped=1 (e.g. annotation ids [7])",
                 "boxes_degenerate_dropped=1 (e.g. annotation ids [8])"):
        assert rule in log, rule
    assert "eval data: 1 images skipped as unreadable" in log
    # The training counters, summed over the batches of steps 1..s, are logged with the training
    # metrics; a batch of 8 is one pass over the 8 training images, so each case counts once per
    # step (crowd boxes are dropped from training examples, and only there).
    for step in (1, 2):
        line = next(li for li in log.splitlines() if f"] [{step}] data/" in li)
        for key, per_step in (("boxes_nan_dropped", 5), ("boxes_unknown_class_dropped", 1),
                              ("boxes_inverted_fixed", 1), ("boxes_clipped", 1),
                              ("boxes_degenerate_dropped", 1), ("boxes_crowd_dropped", 1),
                              ("images_unreadable", 0)):
            assert f"data/{key}={per_step * step}," in line, (key, line)
