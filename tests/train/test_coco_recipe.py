"""The COCO configs read COCO: tfds ``coco/2017`` in automl's 90-slot label space, a missing
dataset fails within seconds of launch with both ways to get it, and the head size is checked
against the label space before anything is built.

The training run uses ``tfds.testing.mock_data`` (random images and objects in COCO's feature
layout), which patches tfds in this process only, so it calls the trainer in-process; the
missing-data case runs ``main.py`` as a user does.
"""

import importlib
import json
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from train_helpers import ROOT, subprocess_env

from effdet_jax import data as data_lib
from effdet_jax.data.label_map import COCO_CATEGORY_IDS
from effdet_jax.data.sources import DataUnavailableError, check_available
from effdet_jax.evaluation import coco_metrics
from effdet_jax.train.config_validation import ConfigError, validate_config

COCO_CONFIGS = ("d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x",
                "lite0", "lite1", "lite2", "lite3", "lite3x", "lite4")


def _config(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_coco_configs_read_tfds_coco_in_90_slots(name):
    config = _config(name)
    assert (config.data.source, config.data.tfds_name) == ("tfds", "coco/2017")
    assert config.data.label_space == "coco90" and config.model.num_classes == 90
    validate_config(config)


@pytest.mark.parametrize("name", ["shapes", "tiny"])
def test_small_configs_say_shapes_themselves(name):
    config = _config(name)
    assert config.data.source == "shapes"
    assert config.data.shapes.num_classes == config.model.num_classes


@pytest.mark.parametrize(
    "label_space, num_classes, expected",
    [("coco90", 80, 90), ("contiguous", 90, 80)],
)
def test_head_size_is_checked_against_the_label_space(label_space, num_classes, expected):
    config = _config("d0")
    config.data.label_space = label_space
    config.model.num_classes = num_classes
    with pytest.raises(ConfigError, match=rf"model.num_classes={num_classes}.*allowed {expected}"):
        validate_config(config)


def test_shapes_head_size_is_checked():
    config = _config("d0")
    config.data.source = "shapes"  # 4 shape classes under a 90-logit head
    with pytest.raises(ConfigError, match=r"model.num_classes=90.*allowed 4.*shapes.num_classes"):
        validate_config(config)


def test_main_without_coco_fails_fast_with_both_fixes(tmp_path):
    empty = tmp_path / "tensorflow_datasets"
    empty.mkdir()
    command = [sys.executable, str(ROOT / "main.py"), "--config=configs/d3.py",
               f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_data_dir={empty}"]
    start = time.monotonic()
    run = subprocess.run(command, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=300)
    elapsed = time.monotonic() - start
    assert run.returncode != 0
    err = run.stderr
    assert "tfds dataset coco/2017 is not prepared" in err, err[-3000:]
    assert f"tfds build coco/2017 --data_dir={empty}" in err
    assert "--config.data.source=coco_json" in err and "instances_train2017.json" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert elapsed < 15, f"took {elapsed:.1f} s to report the missing dataset"


def test_coco_json_paths_are_checked_before_the_model(tmp_path):
    annotations = tmp_path / "instances_val2017.json"
    annotations.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    config = _config("d0").data
    config.source = "coco_json"
    config.eval_annotations = str(annotations)
    config.eval_images = str(tmp_path / "val2017")  # missing folder
    config.train_annotations = str(tmp_path / "missing.json")
    config.train_images = str(tmp_path)
    with pytest.raises(DataUnavailableError) as e:
        check_available(config, ("train", "eval"))
    message = str(e.value)
    assert f"config.data.train_annotations='{tmp_path / 'missing.json'}'" in message
    assert f"config.data.eval_images='{tmp_path / 'val2017'}'" in message
    assert "eval_annotations" not in message.split(".\n")[0]  # the readable file is not blamed
    assert "tfds build coco/2017" in message
    (tmp_path / "val2017").mkdir()
    check_available(config, ("eval",))  # an eval-only run needs only the eval files


def _small_d0() -> ml_collections.ConfigDict:
    """``configs/d0.py`` with its data untouched and the network shrunk to compile in a minute."""
    config = _config("d0")
    config.model.image_size = 64
    config.model.overrides = ml_collections.ConfigDict(
        {"fpn_num_filters": 16, "fpn_cell_repeats": 1, "box_class_repeats": 1, "max_level": 5,
         "backbone_overrides": {"width_coefficient": 0.25, "depth_coefficient": 0.25}})
    config.data.num_parallel_calls = 1
    config.data.shuffle_buffer = 8
    config.train.batch_size = 8
    config.train.total_steps = 2
    config.train.lr_schedule = "constant"
    config.train.lr_warmup_epochs = 0.0
    config.eval.batch_size = 8
    config.eval.num_summary_images = 0
    config.checkpoint.every_steps = 2
    config.log_every_steps = 1
    config.mesh.shard_min_size = 1024
    return config


def test_d0_trains_and_evaluates_on_tfds_coco(tmp_path, monkeypatch):
    from effdet_jax.train import trainer

    config = _small_d0()
    config.data.tfds_data_dir = str(tmp_path / "tensorflow_datasets")
    seen = {"train": [], "eval_gt": None}
    make_train = data_lib.make_train_pipeline

    def recording_train_pipeline(*args, **kwargs):
        pipeline = make_train(*args, **kwargs)
        seen["train_label_space"] = pipeline.label_map.label_space
        inner = iter(pipeline)

        class Recorded:
            def __iter__(self):
                for batch in inner:
                    seen["train"].append(batch)
                    yield batch

        return Recorded()

    evaluate = coco_metrics.CocoEvaluator.evaluate

    def recording_evaluate(self):
        seen["eval_gt"] = self._ground_truth().dataset
        return evaluate(self)

    monkeypatch.setattr(data_lib, "make_train_pipeline", recording_train_pipeline)
    monkeypatch.setattr(coco_metrics.CocoEvaluator, "evaluate", recording_evaluate)
    with tfds.testing.mock_data(num_examples=6):
        metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
        validation = list(tfds.builder("coco/2017", data_dir=config.data.tfds_data_dir)
                          .as_dataset(split="validation"))

    assert "AP" in metrics and np.isfinite(metrics["AP"])
    # Training batches: tfds COCO labels mapped to automl's slots (logit = category id - 1).
    assert seen["train_label_space"] == "coco90" and len(seen["train"]) >= 2
    labels = np.concatenate([b["classes"][b["classes"] >= 0] for b in seen["train"]])
    coco_slots = {c - 1 for c in COCO_CATEGORY_IDS}
    assert labels.size and set(labels.tolist()) <= coco_slots
    assert labels.max() >= 80  # ids 81..90 exist only in the 90-slot space
    # Evaluation ground truth: the images and categories of the mock validation split.
    gt = seen["eval_gt"]
    assert {im["id"] for im in gt["images"]} == {int(ex["image/id"]) for ex in validation}
    expected = {int(ex["image/id"]): {COCO_CATEGORY_IDS[int(label)]
                                      for label in ex["objects"]["label"].numpy()}
                for ex in validation}
    for ann in gt["annotations"]:
        assert ann["category_id"] in expected[ann["image_id"]]
    assert {c["id"] for c in gt["categories"]} == set(COCO_CATEGORY_IDS)
