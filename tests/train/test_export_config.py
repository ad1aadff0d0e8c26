"""``config.export`` keys parse from the command line and bad values fail early, naming the key
and the fix (``effdet_jax.export.options``, through ``validate_config``)."""

import pytest
from test_config import CONFIG_DIR, _parse

from effdet_jax.export.options import FORMATS, parse_options
from effdet_jax.train.config_validation import ConfigError, validate_config


def test_export_keys_parse_from_flags():
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.export.formats=onnx,stablehlo",
                    "--config.export.batch_size=dynamic", "--config.export.with_nms=false")
    options = parse_options(config.export)
    assert options.formats == ("stablehlo", "onnx")  # FORMATS order
    assert options.batch_size is None and options.with_nms is False
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.export.batch_size=4")
    assert parse_options(config.export).batch_size == 4
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.export.formats=onnx,tflite",
                    "--config.export.dtype=int8")
    assert parse_options(config.export).dtype == "int8"  # LiteRT's; the ONNX file stays float32


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("formats", "onnx,coreml", ", ".join(FORMATS)),
        ("formats", "", "empty"),
        ("batch_size", "0", "dynamic"),
        ("batch_size", "many", "positive integer"),
        ("dtype", "int4", "float16"),
        ("dtype", "int8", "formats=tflite"),
    ],
)
def test_bad_export_values_fail_naming_key_and_fix(key, value, expected):
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}")
    config.export[key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert f"config.export.{key}" in message and expected in message, message


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--config.eval.postprocess.method=soft_linear"], "method=hard"),
        (["--config.eval.postprocess.per_class=true"], "per_class=false"),
        (["--config.export.dtype=int8"], "with_nms=false"),
    ],
)
def test_nms_in_savedmodel_or_litert_refuses_what_tf_cannot_do(flags, expected):
    """SavedModel / LiteRT with NMS (TF's NonMaxSuppressionV5) fail validation, before anything is
    compiled, for the options TF's op has no equivalent of; the same options pass with raw outputs."""
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.export.formats=stablehlo,tflite",
                    *flags)
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert "with NMS" in str(info.value) and expected in str(info.value), str(info.value)
    config.export.with_nms = False
    validate_config(config)


def test_nms_in_savedmodel_or_litert_takes_a_dynamic_batch():
    """A dynamic batch with NMS passes validation: ``tf_nms`` loops over the images (a While loop,
    LiteRT's builtin WHILE); ``test_export_litert_cli.py`` runs such files at batch 1 and 7."""
    config = _parse(f"--config={CONFIG_DIR / 'd0.py'}", "--config.export.formats=savedmodel,tflite",
                    "--config.export.batch_size=dynamic")
    assert config.export.with_nms
    validate_config(config)
