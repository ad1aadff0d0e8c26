"""Config files load, validate, and bad keys/values fail early with the key and allowed values."""

import os
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from effdet_jax.data.sources import SOURCES
from effdet_jax.detection.postprocess import CANDIDATE_MODES, NMS_METHODS
from effdet_jax.models.bifpn import FUSION_METHODS
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS
from effdet_jax.models.layers import ACTIVATIONS
from effdet_jax.models.model_config import LAYER_LOOPS
from effdet_jax.train.compile_options import CPU_OPT_PRESETS
from effdet_jax.train.config_validation import ConfigError, validate_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
MODEL_CONFIGS = [f"d{i}" for i in range(8)] + ["d7x"] + [f"lite{i}" for i in range(5)]


def _parse(*args: str):
    """Parse flags like main.py does (lock_config=True) into a fresh FlagValues.

    config_flags reads the ``--config.*`` overrides from ``sys.argv``, so it is set too.
    """
    argv = ["main.py", *args]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
    saved, sys.argv = sys.argv, argv
    try:
        flag_values(argv)
    finally:
        sys.argv = saved
    return flag_values.config


@pytest.mark.parametrize("name", MODEL_CONFIGS + ["shapes", "tiny"])
def test_config_files_validate(name):
    config = _parse(f"--config={CONFIG_DIR / name}.py")
    validate_config(config, num_devices=8)
    expected = "efficientdet-d0" if name in ("shapes", "tiny") else f"efficientdet-{name}"
    assert config.model.name == expected


@pytest.mark.parametrize(
    "arg", ["fusion.py:" + m for m in FUSION_METHODS]
    + ["drop_connect.py:" + v for v in DROP_CONNECT_VARIANTS],
)
def test_ablation_configs_validate(arg):
    config = _parse(f"--config={CONFIG_DIR / 'ablations' / arg}")
    validate_config(config, num_devices=8)
    value = arg.split(":")[1]
    assert value in (config.model.fpn_weight_method, config.model.drop_connect_variant)


def test_command_line_overrides_are_typed():
    config = _parse(
        f"--config={CONFIG_DIR / 'd3.py'}",
        "--config.train.batch_size=128",
        "--config.model.image_size=256",
        "--config.loss.iou_loss_type=ciou",
    )
    assert config.train.batch_size == 128 and config.model.image_size == 256
    assert config.loss.iou_loss_type == "ciou"


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="batch_sise"):
        _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.train.batch_sise=3")


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("train.optimizer", "lamb", "sgd"),
        ("train.lr_schedule", "linear", "cosine"),
        ("train.nonfinite_policy", "ignore", "skip"),
        ("data.on_bad_data", "warn", "'report', 'error'"),
        ("model.dtype", "float8", "bfloat16"),
        ("model.dtype", "float16", "loss scaling"),
        ("model.remat", "all", "blocks"),
        ("model.layer_loop", "while", "unrolled"),
        ("xla_cpu_opt_preset", "O0", "fast_compile"),
        ("model.fpn_weight_method", "max", "fastattn"),
        ("model.drop_connect_variant", "block", "channel"),
        ("loss.iou_loss_type", "l1", "ciou"),
        ("eval.postprocess.method", "nms", "soft_gaussian"),
        ("train.ema_decay", 1.5, "< 1"),
        ("train.grad_accum_steps", 3, "divisor"),
        ("train.batch_size", 12, "multiple of mesh data size 8"),
        ("mesh.model", 3, "divide"),
        ("model.name", "efficientdet-d9", "d7x"),
    ],
)
def test_bad_values_fail_naming_key_and_allowed(key, value, allowed):
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=8)
    message = str(info.value)
    assert allowed in message, message
    assert key.split(".")[0] in message, message


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("model.fpn_weight_method", FUSION_METHODS),
        ("model.drop_connect_variant", DROP_CONNECT_VARIANTS),
        ("model.layer_loop", LAYER_LOOPS),
        ("xla_cpu_opt_preset", tuple(CPU_OPT_PRESETS)),
        ("model.overrides.activation", tuple(ACTIVATIONS)),
        ("eval.postprocess.method", NMS_METHODS),
        ("eval.postprocess.candidates", CANDIDATE_MODES),
        ("data.source", SOURCES),
    ],
)
def test_unknown_enumerated_value_lists_the_allowed_values(key, allowed):
    """Each enumerated key is checked against its one definition, and the message lists it."""
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.unlocked():  # model.overrides starts empty
        node[leaf] = "foo"
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=8)
    message = str(info.value)
    assert "foo" in message and key.split(".")[-1] in message, message
    assert all(repr(value) in message for value in allowed), message


def test_configs_and_train_step_do_not_import_tensorflow():
    """Building an experiment from a config needs no TensorFlow (only the input pipeline does), so
    it stays cheap to import and runs where TensorFlow is not installed (e.g. a GPU image)."""
    root = CONFIG_DIR.parent
    code = (
        "import sys; import configs.d3; from effdet_jax.train import experiment; "
        "from effdet_jax import data; data.validate_data_config; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; "
        "data.make_train_pipeline; assert 'tensorflow' in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
