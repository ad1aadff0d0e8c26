"""``main.py --mode=eval`` with only ``--config.init.checkpoint`` (no training, no workdir
checkpoint) on automl's own D0 checkpoints, TF1 (EMA copies) and TF2 Keras.

The data is automl's reference input (``common/input.npz``, recovered exactly as uint8) written as
512x512 PNGs in a COCO-json folder whose ground truth is automl's own detections of that input
(``d0/detections.npz``: global soft-NMS, scores above ``SCORE_THRESHOLD``, COCO ids, all 90 ids as
categories). AP >= 0.99 then checks loader, input normalisation, network, post-processing, id
mapping and evaluation together against automl.
"""

import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from init_helpers import write_coco_folder
from train_helpers import ROOT, subprocess_env

MEAN_RGB = 255.0 * np.array([0.485, 0.456, 0.406])
STDDEV_RGB = 255.0 * np.array([0.229, 0.224, 0.225])
SCORE_THRESHOLD = 0.3  # 42 + 4 ground-truth boxes on the two images
CHECKPOINTS = {
    "tf1_ema": ("d0/ckpt_tf1_ema.tar.xz", "efficientdet-d0"),
    "tf2_keras": ("d0/ckpt_tf2_save_weights.tar.xz", "d0-tf2"),
}


@pytest.fixture(scope="module")
def automl_folder(automl_reference, tmp_path_factory):
    automl_reference.skip_unless_full("automl's TF checkpoints and input.npz")
    image = automl_reference.input("d0")
    uint8 = np.rint(image * STDDEV_RGB + MEAN_RGB)
    assert uint8.min() >= 0 and uint8.max() <= 255
    det = automl_reference.arrays("d0/detections.npz")
    boxes, category_ids = [], []
    for i in range(len(image)):
        n = int(det["global_gaussian_valid_len"][i])
        keep = det["global_gaussian_scores"][i, :n] > SCORE_THRESHOLD
        boxes.append(det["global_gaussian_boxes"][i, :n][keep])
        category_ids.append(det["global_gaussian_classes"][i, :n][keep].astype(int))
    categories = [{"id": i, "name": f"category_{i}"} for i in range(1, 91)]
    root = tmp_path_factory.mktemp("automl_folder")
    return write_coco_folder(root, list(uint8.astype(np.uint8)), boxes, categories, category_ids)


@pytest.mark.fullsize
@pytest.mark.parametrize("kind", sorted(CHECKPOINTS))
def test_eval_of_an_imported_automl_checkpoint(kind, automl_reference, automl_folder, tmp_path):
    archive, folder = CHECKPOINTS[kind]
    with tarfile.open(automl_reference.root / archive) as tar:
        tar.extractall(tmp_path, filter="data")
    annotations, images = automl_folder
    data = [f"--config.data.{split}_{what}={path}" for split in ("train", "eval")
            for what, path in (("annotations", annotations), ("images", images))]
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "main.py"), f"--config={ROOT / 'configs/d0.py'}",
            f"--workdir={tmp_path / 'run'}", "--mode=eval",
            f"--config.init.checkpoint={tmp_path / folder}",
            "--config.data.source=coco_json", "--config.data.label_space=coco90", *data,
            "--config.eval.batch_size=2", "--config.eval.num_summary_images=0",
        ],
        cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr + (tmp_path / "run" / "log.txt").read_text()  # console and full log
    assert f"config.init.checkpoint={tmp_path / folder}" in log  # the init table
    # automl's 676 variables as the stacked layout's 444 leaves (models/layout.py).
    assert "444 loaded, 0 re-initialised, 0 unused" in log
    match = re.search(r"\[0\] collection=eval .*eval/AP=([0-9.]+)", log)  # the eval scalars
    assert match, log[-3000:]
    assert float(match[1]) >= 0.99, log[-3000:]
