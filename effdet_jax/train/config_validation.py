"""Checks a trainer config before anything is built or compiled.

Unknown keys are already rejected by ``lock_config`` (ml_collections names the key); this module
rejects bad *values* with a message that names the key and what is allowed, so a typo in a 300-epoch
run fails in a second instead of after compilation.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from effdet_jax.data.config import known_num_classes, validate_data_config
from effdet_jax.data.report import ON_BAD_DATA
from effdet_jax.detection.losses import IOU_LOSS_TYPES, LossConfig
from effdet_jax.detection.postprocess import CANDIDATE_MODES, NMS_METHODS, PostprocessConfig
from effdet_jax.export.options import nms_unsupported_reason
from effdet_jax.export.options import parse_options as parse_export_options
from effdet_jax.models import model_config
from effdet_jax.models.bifpn import FUSION_METHODS
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS
from effdet_jax.train.compile_options import CPU_OPT_PRESETS
from effdet_jax.train.experiment import model_overrides

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "stepwise", "polynomial", "constant")
NONFINITE_POLICIES = ("error", "skip")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the allowed values."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is invalid: allowed {allowed}")


def _one_of(config: ml_collections.ConfigDict, key: str, allowed: Sequence[Any]) -> None:
    value = _get(config, key)
    _check(value in allowed, key, value, f"one of {list(allowed)}")


def _positive(config: ml_collections.ConfigDict, key: str, strict: bool = True) -> None:
    value = _get(config, key)
    ok = value is not None and (value > 0 if strict else value >= 0)
    _check(ok, key, value, "a number > 0" if strict else "a number >= 0")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _check_freeze_and_init(config: ml_collections.ConfigDict) -> None:
    """``train.freeze`` is a regex; ``train.freeze_bn`` needs it; ``init`` names one source."""
    freeze = config.train.freeze
    if freeze:
        try:
            re.compile(freeze)
        except re.error as e:
            raise ConfigError(f"config.train.freeze={freeze!r} is not a regular expression: {e}") from None
    _check(not config.train.freeze_bn or bool(freeze), "train.freeze_bn", config.train.freeze_bn,
           "True only with config.train.freeze set (it keeps the statistics of the frozen layers)")
    init = config.init
    if init.checkpoint and init.backbone:
        raise ConfigError(
            f"config.init.checkpoint={init.checkpoint!r} and config.init.backbone={init.backbone!r} "
            "are both set: a whole-detector checkpoint has its own backbone; set one of them")


def model_choices() -> dict[str, Sequence[Any]]:
    """Allowed values of the enumerated ``config.model`` options (``None``: the model table's)."""
    return {
        "fpn_weight_method": FUSION_METHODS,
        "drop_connect_variant": DROP_CONNECT_VARIANTS,
    }


def validate_config(
    config: ml_collections.ConfigDict,
    num_devices: int | None = None,
    model_config_fn: Callable[..., Any] | None = None,
) -> None:
    """Raises ``ConfigError`` naming the first invalid key of ``config``.

    Args:
      config: a trainer config (``configs/default.py`` layout).
      num_devices: global device count; when given, mesh and batch divisibility are checked too.
      model_config_fn: ``get_efficientdet_config``-like callable used to check the model name and
        overrides (defaults to the real one).
    """
    t = config.train
    _one_of(config, "train.optimizer", OPTIMIZERS)
    _one_of(config, "train.lr_schedule", LR_SCHEDULES)
    _one_of(config, "train.nonfinite_policy", NONFINITE_POLICIES)
    _one_of(config, "model.dtype", model_config.DTYPES)
    _check(config.model.dtype != "float16", "model.dtype", config.model.dtype,
           "'float32' or 'bfloat16' for training and evaluation: float16 activations need loss "
           "scaling, which the train step does not do (bfloat16 has float32's range and needs "
           "none); float16 is for the library's inference-only use")
    _one_of(config, "model.remat", model_config.REMAT_POLICIES)
    _one_of(config, "model.layer_loop", model_config.LAYER_LOOPS)
    _one_of(config, "eval.postprocess.method", NMS_METHODS)
    _one_of(config, "eval.postprocess.candidates", CANDIDATE_MODES)
    _one_of(config, "loss.iou_loss_type", (None, *IOU_LOSS_TYPES))
    _one_of(config, "data.on_bad_data", ON_BAD_DATA)
    _one_of(config, "xla_cpu_opt_preset", tuple(CPU_OPT_PRESETS))
    for key in ("train.batch_size", "train.learning_rate", "train.num_examples_per_epoch",
                "train.grad_accum_steps", "eval.batch_size", "log_every_steps",
                "checkpoint.every_steps", "eval.every_steps", "model.num_classes"):
        _positive(config, key)
    for key in ("train.lr_warmup_init", "train.lr_warmup_epochs", "loss.weight_decay",
                "train.clip_gradients_norm", "train.momentum", "checkpoint.keep_best"):
        _positive(config, key, strict=False)
    _positive(config, "checkpoint.keep")
    if t.total_steps is None:
        _positive(config, "train.num_epochs")
    else:
        _positive(config, "train.total_steps")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "0 <= value < 1 (0 disables)")
    _check(0.0 <= t.momentum < 1.0, "train.momentum", t.momentum, "0 <= value < 1")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        t.grad_accum_steps,
        f"a divisor of train.batch_size={t.batch_size}",
    )
    _check_freeze_and_init(config)
    _check(config.mesh.model >= 1, "mesh.model", config.mesh.model, "an integer >= 1")
    _check(config.mesh.data == -1 or config.mesh.data >= 1, "mesh.data", config.mesh.data,
           "-1 (all remaining devices) or an integer >= 1")

    try:
        validate_data_config(config.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    known = known_num_classes(config.data)
    if known is not None:
        n, reason = known
        _check(config.model.num_classes == n, "model.num_classes", config.model.num_classes,
               f"{n}, from {reason}")

    sections = (("loss", LossConfig), ("eval.postprocess", PostprocessConfig))
    for key, cls in sections:
        try:
            cls(**_get(config, key).to_dict())
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.{key}: {e}") from None

    try:
        export = parse_export_options(config.export)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    converted = [f for f in export.formats if f in ("savedmodel", "tflite")]
    if export.with_nms and converted:
        reason = nms_unsupported_reason(config.eval.postprocess,
                                        export.dtype if "tflite" in converted else "float32")
        if reason:
            raise ConfigError(f"config.export.formats={config.export.formats!r} with NMS: {reason}")

    choices = model_choices()
    for key, allowed in choices.items():
        value = config.model[key]
        if value is not None:
            _check(value in allowed, f"model.{key}", value, f"one of {list(allowed)}")
    if config.model.image_size is not None:
        _positive(config, "model.image_size")
    if config.model.backbone_drop_connect_rate is not None:
        rate = config.model.backbone_drop_connect_rate
        _check(0.0 <= rate < 1.0, "model.backbone_drop_connect_rate", rate, "0 <= value < 1")

    if num_devices is not None:
        from effdet_jax.train.mesh import mesh_shape

        try:
            data, model = mesh_shape(config.mesh, num_devices)
        except ValueError as e:
            raise ConfigError(f"config.mesh: {e}") from None
        per_step = t.batch_size // t.grad_accum_steps
        _check(per_step % data == 0, "train.batch_size", t.batch_size,
               f"a multiple of mesh data size {data} x train.grad_accum_steps {t.grad_accum_steps}")
        _check(config.eval.batch_size % data == 0, "eval.batch_size", config.eval.batch_size,
               f"a multiple of mesh data size {data}")

    model_config_fn = model_config_fn or model_config.get_efficientdet_config
    try:
        model_config_fn(
            config.model.name,
            num_classes=config.model.num_classes,
            **model_overrides(config.model),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"config.model: {e}") from None
