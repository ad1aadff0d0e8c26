"""Bad ``config.init`` inputs fail naming the file and the cause, before anything is compiled:
a missing path, an unknown format, a truncated file, a checkpoint of another architecture (d1
into d0), a classifier given as a detector, both keys at once; ``main.py`` prints the message
without a traceback."""

import dataclasses
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from init_helpers import automl_named, zero_variables
from train_helpers import ROOT, subprocess_env, tiny_config

from effdet_jax import efficientdet
from effdet_jax.train import experiment, initialization, trainer
from effdet_jax.train.checkpoint_files import CheckpointFileError
from effdet_jax.train.config_validation import ConfigError


@pytest.fixture(autouse=True)
def no_compilation(monkeypatch):
    """Compiling the init function is the first compilation of every mode: forbid it."""

    def compiled(self):
        raise AssertionError("compiled the init function before the bad input was reported")

    monkeypatch.setattr(experiment.Experiment, "init_state", compiled)


def _thin_d0_npz(path, num_classes=90):
    config = tiny_config()
    config.model.num_classes = num_classes
    model = experiment.build_model(config.model)
    np.savez(path, **automl_named(zero_variables(model), model))


@pytest.fixture(scope="module")
def tiny_experiment():
    return experiment.build_experiment(tiny_config())


def _evaluate(tiny_experiment, **init):
    """The error of ``initialization.initial_state`` (what train, eval and predict call) for the
    thin d0 of ``configs/tiny.py`` with ``config.init`` set to ``init``."""
    config = tiny_experiment.config.copy_and_resolve_references()
    for key, value in init.items():
        config.init[key] = str(value)
    with pytest.raises(CheckpointFileError) as error:
        initialization.initial_state(dataclasses.replace(tiny_experiment, config=config))
    return str(error.value)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_missing_path(tmp_path, mode):
    """Through the trainer's entry points, as main.py calls them."""
    config = tiny_config()
    config.init.checkpoint = str(tmp_path / "nope.npz")
    with pytest.raises(CheckpointFileError) as error:
        if mode == "eval":
            trainer.evaluate(config, str(tmp_path / "run"))
        else:
            trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert f"config.init.checkpoint: {tmp_path / 'nope.npz'}: no such file or folder" in str(error.value)


def test_unknown_format(tmp_path, tiny_experiment):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01 not a checkpoint" * 10)
    message = _evaluate(tiny_experiment, checkpoint=path)
    assert f"{path}: unknown format" in message and "expected an automl" in message


def test_truncated_npz(tmp_path, tiny_experiment):
    path = tmp_path / "tiny.npz"
    _thin_d0_npz(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = _evaluate(tiny_experiment, checkpoint=path)
    assert str(path) in message and "truncated" in message


def test_npz_of_unknown_names(tmp_path, tiny_experiment):
    path = tmp_path / "other.npz"
    np.savez(path, w=np.zeros(3), b=np.ones(2))
    message = _evaluate(tiny_experiment, checkpoint=path)
    assert str(path) in message and "neither automl, effdet nor timm names" in message


def test_other_width_names_the_variable(tmp_path, tiny_experiment):
    """A checkpoint of the same layout with other widths (the 64-channel d0 head into the
    16-channel thin d0): the message names a variable and both shapes."""
    model = efficientdet("efficientdet-d0", num_classes=90, fpn_num_filters=32, fpn_cell_repeats=1,
                         box_class_repeats=1, max_level=5, image_size=64,
                         backbone_overrides={"width_coefficient": 0.25, "depth_coefficient": 0.25})
    path = tmp_path / "wide.npz"
    np.savez(path, **automl_named(zero_variables(model), model))
    message = _evaluate(tiny_experiment, checkpoint=path)
    assert str(path) in message and "another model or variant" in message
    assert "shape (32,) != (16,)" in message or "(32,)" in message, message


def test_classifier_given_as_detector(tmp_path, tiny_experiment):
    path = tmp_path / "classifier.npz"
    np.savez(path, **{"conv_stem.weight": np.zeros((8, 3, 3, 3), np.float32)})
    message = _evaluate(tiny_experiment, checkpoint=path)
    assert "no detector class head" in message and "config.init.backbone" in message


def test_backbone_of_another_variant(tmp_path, tiny_experiment):
    """init.backbone with a detector file of another backbone width: names the variable."""
    path = tmp_path / "d0.npz"
    model = efficientdet("efficientdet-d0", num_classes=90, image_size=64, max_level=5)
    np.savez(path, **automl_named(zero_variables(model), model))
    message = _evaluate(tiny_experiment, backbone=path)
    assert "config.init.backbone" in message and "another EfficientNet variant" in message
    assert "params/backbone/block_1/se/se_expand/bias: efficientnet-b0/blocks_1/se/conv2d_1/bias " \
        "has shape (96,), the model (48,)" in message


def test_both_keys_is_a_config_error(tmp_path):
    config = tiny_config()
    config.init.checkpoint = config.init.backbone = str(tmp_path)
    with pytest.raises(ConfigError, match="set one of them"):
        trainer.evaluate(config, str(tmp_path / "run"))


def test_d1_checkpoint_into_d0(tmp_path):
    """A whole D1 (automl names) into configs/d0.py: fails naming variables and shapes."""
    from configs import d0

    d1 = efficientdet("efficientdet-d1")
    path = tmp_path / "d1.npz"
    np.savez(path, **automl_named(zero_variables(d1), d1))
    config = d0.get_config()
    config.init.checkpoint = str(path)
    exp = experiment.build_experiment(config)
    with pytest.raises(CheckpointFileError) as error:
        initialization.initial_state(exp)
    message = str(error.value)
    assert str(path) in message and "another model or variant" in message
    assert "expected name(s) absent from the checkpoint: ['efficientnet-b0/" in message


@pytest.mark.fullsize
def test_truncated_tf_checkpoint(automl_reference, tmp_path):
    automl_reference.skip_unless_full("automl's TF1 checkpoint")
    with tarfile.open(automl_reference.root / "d0/ckpt_tf1_ema.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    data = tmp_path / "efficientdet-d0/model.data-00000-of-00001"
    os.truncate(data, data.stat().st_size // 2)
    from configs import d0

    config = d0.get_config()
    config.init.checkpoint = str(tmp_path / "efficientdet-d0")
    exp = experiment.build_experiment(config)
    with pytest.raises(CheckpointFileError) as error:
        initialization.initial_state(exp)
    message = str(error.value)
    assert str(tmp_path / "efficientdet-d0") in message and "truncated" in message


def test_main_prints_the_cause_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), f"--config={ROOT / 'configs/tiny.py'}",
         f"--workdir={tmp_path / 'run'}", "--mode=eval", f"--config.init.checkpoint={missing}"],
        cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert f"error: config.init.checkpoint: {missing}: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_checkpoint_anywhere_says_both_ways(tmp_path):
    with pytest.raises(initialization.NoCheckpointError, match="config.init.checkpoint=PATH"):
        trainer.evaluate(tiny_config(), str(tmp_path / "run"))
