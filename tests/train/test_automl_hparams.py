"""Every COCO config equals google/automl's hparams for its model.

``hparams.json`` in the automl reference folder holds automl's
``hparams_config.get_efficientdet_config(name).as_dict()`` for all 15 models. For each model the
test builds ``configs/<name>.py`` the way the trainer resolves it (``config.model`` through the
model table, ``config.loss`` / ``config.eval.postprocess`` into their dataclasses, the input
normalisation the pipelines use) and compares every field this project models, in automl's
terms. Every key of hparams.json is either compared (``_ours`` / ``_expected``), implemented as
one fixed behaviour whose automl value is checked (``FIXED``), or listed with the reason it is not
modelled or is modelled differently (``NOT_MODELLED``, ``DIFFERENT``); the key-coverage test fails
on any key in none of them, so a new automl field cannot go unnoticed.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import pytest

from effdet_jax.detection.losses import LossConfig
from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.models.model_config import MODEL_NAMES
from effdet_jax.train import experiment

# automl's NMS method names -> ours (automl's TF path offers hard and gaussian soft-NMS; ``None`` /
# ``""`` mean hard there).
NMS_METHOD_NAMES = {"gaussian": "soft_gaussian", "hard": "hard", None: "hard", "": "hard"}

# Behaviour this project implements one way only, as automl's default: automl's value must be
# this one (a model that changes it would need the option implemented). key -> (value, reason).
FIXED: dict[str, tuple[Any, str]] = {
    "conv_after_downsample": (False, "BiFPN resampling: 1x1 conv before the max-pool (bifpn.py)"),
    "conv_bn_act_pattern": (False, "BiFPN node op order act -> separable conv -> BN (bifpn.py)"),
    "apply_bn_for_resampling": (True, "resampling 1x1 convs are followed by BN (bifpn.py)"),
    "fpn_name": (None, "the BiFPN graph of the paper is the only feature network"),
    "fpn_config": (None, "no custom FPN node graphs; the BiFPN graph is built in bifpn.py"),
    "backbone_config": (None, "backbones come from their name (efficientnet_config table)"),
    "data_format": ("channels_last", "activations are NHWC everywhere"),
    "heads": (["object_detection"], "only the detection heads exist; no segmentation head"),
    "drop_remainder": (True, "training batches always drop the remainder (static shapes)"),
    "grid_mask": (False, "GridMask augmentation is not implemented"),
    "scale_range": (False, "scale jitter is automl's jitter_min/jitter_max form only"),
    "positives_momentum": (None, "the loss normaliser is the batch's positive count + 1, "
                                 "without automl's optional moving average"),
    "loss_scale": (None, "no loss scaling: compute is float32 or bfloat16, losses float32"),
    "regenerate_source_id": (False, "examples keep their dataset image ids"),
}

# Fields with no counterpart here because they do not change what is trained or predicted.
NOT_MODELLED: dict[str, str] = {
    "is_training_bn": "TF1 estimator switch for BN mode; flax's `train` argument decides per call",
    "strategy": "TF distribution strategy; devices come from config.mesh",
    "use_keras_model": "automl's choice between its Keras and TF1 graph code; there is one model",
    "seg_num_classes": "segmentation head only (heads is fixed to object_detection)",
    "target_size": "segmentation masks only",
    "dataset_type": "automl's reader for tfrecord variants; config.data.source picks the reader",
    "ckpt_var_scope": "variable scope for automl checkpoint loading; effdet_jax.convert maps names",
    "skip_mismatch": "automl checkpoint loading; effdet_jax.convert reports mismatches instead",
    "sample_image": "TensorBoard sample image path; eval.num_summary_images draws eval images",
    "img_summary_steps": "automl's TensorBoard image frequency; images are drawn at each eval",
    "tflite_max_detections": "TFLite export only (no TFLite export here)",
    "verbose": "Keras fit verbosity; the console logs every log_every_steps",
    "pyfunc": "nms_configs: automl's numpy vs TF NMS implementation; one jax NMS here",
}

# Modelled differently on purpose: key -> reason.
DIFFERENT: dict[str, str] = {
    "max_nms_inputs": (
        "automl 0 keeps every anchor's best class before NMS; here the same candidate mode "
        "(`max_class`, compared) keeps the top pre_nms_top_k=5000 anchors by logit, which gives "
        "the same D0 detections (tested in tests/detection) and is 5-7x faster"),
    "map_freq": "automl evaluates every map_freq epochs; here every eval.every_steps steps",
    "save_freq": "automl saves every epoch; here every checkpoint.every_steps steps",
    "grad_checkpoint": (
        "memory, not numerics: automl leaves it off for every model; here config.model.remat is "
        "chosen per config from the measured activation memory (configs/d5.py-d7x.py: "
        "blocks+heads, about 1/8 of none's; benchmarks/RESULTS.md), and tests/train/test_remat.py "
        "checks every policy gives the same loss, gradients and BN statistics"),
}

NMS_KEYS = ("method", "iou_thresh", "score_thresh", "sigma", "max_output_size", "max_nms_inputs",
            "pyfunc")


def _short(model_name: str) -> str:
    return model_name.removeprefix("efficientdet-")


def _load_config(model_name: str):
    return importlib.import_module(f"configs.{_short(model_name)}").get_config()


@pytest.fixture(scope="module")
def hparams(automl_reference) -> dict[str, dict[str, Any]]:
    return automl_reference.json("hparams.json")


def _triple(value: Any) -> tuple[float, ...]:
    values = (value,) * 3 if isinstance(value, (int, float)) else value
    return tuple(float(v) for v in values)


def _image_size(value: Any) -> tuple[int, int]:
    """automl's image_size: an int, or ``"WxH"`` -> (height, width)."""
    if isinstance(value, str):
        width, height = (int(v) for v in value.lower().split("x"))
        return height, width
    return int(value), int(value)


def _ours(config) -> dict[str, Any]:
    """Our resolved settings, keyed and expressed as automl's hparams."""
    model = experiment.build_model(config.model).config
    mean_rgb, stddev_rgb = experiment.input_normalization(config.model)
    loss = LossConfig(**config.loss.to_dict())
    post = PostprocessConfig(**config.eval.postprocess.to_dict())
    data, train = config.data, config.train
    return {
        "name": model.name,
        "num_classes": model.num_classes,
        "image_size": model.image_size,
        "min_level": model.min_level,
        "max_level": model.max_level,
        "num_scales": model.num_scales,
        "aspect_ratios": model.aspect_ratios,
        "anchor_scale": model.anchor_scale,
        "act_type": model.activation,
        "mean_rgb": tuple(mean_rgb),
        "stddev_rgb": tuple(stddev_rgb),
        "backbone_name": model.backbone_name,
        "survival_prob": model.backbone_drop_connect_rate,
        "fpn_num_filters": model.fpn_num_filters,
        "fpn_cell_repeats": model.fpn_cell_repeats,
        "fpn_weight_method": model.fpn_weight_method,
        "box_class_repeats": model.box_class_repeats,
        "separable_conv": model.separable_conv,
        "mixed_precision": model.dtype != "float32",
        "label_map": data.label_space,
        "input_rand_hflip": data.hflip,
        "jitter_min": data.jitter_min,
        "jitter_max": data.jitter_max,
        "autoaugment_policy": data.autoaugment_policy,
        "max_instances_per_image": data.max_instances_per_image,
        "skip_crowd_during_training": data.skip_crowd_during_training,
        "alpha": loss.alpha,
        "gamma": loss.gamma,
        "delta": loss.delta,
        "label_smoothing": loss.label_smoothing,
        "box_loss_weight": loss.box_loss_weight,
        "iou_loss_type": loss.iou_loss_type,
        "iou_loss_weight": loss.iou_loss_weight,
        "weight_decay": loss.weight_decay,
        "optimizer": train.optimizer,
        "momentum": train.momentum,
        "learning_rate": train.learning_rate,
        "lr_warmup_init": train.lr_warmup_init,
        "lr_warmup_epoch": train.lr_warmup_epochs,
        "lr_decay_method": train.lr_schedule,
        "poly_lr_power": train.poly_lr_power,
        "first_lr_drop_epoch": train.first_lr_drop_epoch,
        "second_lr_drop_epoch": train.second_lr_drop_epoch,
        "num_epochs": train.num_epochs,
        "clip_gradients_norm": train.clip_gradients_norm,
        "moving_average_decay": train.ema_decay,
        "var_freeze_expr": train.freeze or None,  # config.train.freeze: "" trains everything
        "nms_configs": {
            "method": post.method,
            "iou_thresh": post.iou_threshold,
            "score_thresh": post.effective_score_threshold,
            "sigma": post.sigma,
            "max_output_size": post.max_detections,
            "candidates": post.candidates,
            "per_class": post.per_class,
        },
    }


def _expected(h: dict[str, Any]) -> dict[str, Any]:
    """automl's hparams in the form ``_ours`` gives, with automl's defaults for ``None`` resolved
    as automl's code resolves them."""
    out = {key: h[key] for key in (
        "name", "num_classes", "min_level", "max_level", "num_scales", "anchor_scale", "act_type",
        "backbone_name", "fpn_num_filters", "fpn_cell_repeats", "box_class_repeats",
        "separable_conv", "mixed_precision", "input_rand_hflip", "jitter_min",
        "jitter_max", "max_instances_per_image", "skip_crowd_during_training", "alpha", "gamma",
        "delta", "label_smoothing", "box_loss_weight", "iou_loss_type", "iou_loss_weight",
        "weight_decay", "optimizer", "momentum", "learning_rate", "lr_warmup_init",
        "lr_warmup_epoch", "lr_decay_method", "poly_lr_power", "first_lr_drop_epoch",
        "second_lr_drop_epoch", "num_epochs", "clip_gradients_norm", "moving_average_decay",
        "var_freeze_expr",
    )}
    out["image_size"] = _image_size(h["image_size"])
    out["aspect_ratios"] = tuple(
        tuple(a) if isinstance(a, list) else float(a) for a in h["aspect_ratios"])
    out["mean_rgb"] = _triple(h["mean_rgb"])
    out["stddev_rgb"] = _triple(h["stddev_rgb"])
    # automl's EfficientDetNet: survival_prob None keeps the backbone builder's 0.8, except that
    # a 'b0' backbone gets 0 (drop-connect off); ours holds the drop-connect rate 1 - survival.
    if h["survival_prob"] is None:
        out["survival_prob"] = 0.0 if "b0" in h["backbone_name"] else 0.2
    else:
        out["survival_prob"] = 1.0 - h["survival_prob"]
    out["fpn_weight_method"] = h["fpn_weight_method"] or "fastattn"  # automl's default
    out["label_map"] = "coco90" if h["label_map"] is None else h["label_map"]  # COCO's 90 ids
    out["autoaugment_policy"] = h["autoaugment_policy"] or ""
    nms = h["nms_configs"]
    hard = NMS_METHOD_NAMES[nms["method"]] == "hard"
    # automl postprocess.nms: `x or default`, so 0 / None take the defaults below.
    out["nms_configs"] = {
        "method": NMS_METHOD_NAMES[nms["method"]],
        "iou_thresh": nms["iou_thresh"] or 0.5,
        "score_thresh": nms["score_thresh"] or (float("-inf") if hard else 0.001),
        "sigma": nms["sigma"] or 0.5,
        "max_output_size": nms["max_output_size"],
        # max_nms_inputs 0: one candidate per anchor (its best class); > 0: top (anchor, class).
        "candidates": "max_class" if not nms["max_nms_inputs"] else "top_pairs",
        "per_class": False,  # automl's inference path is postprocess_global
    }
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or a == b
    return a == b


def test_every_model_has_a_config_and_a_table_entry(hparams):
    assert set(hparams) == set(MODEL_NAMES)
    for name in hparams:
        assert _load_config(name).model.name == name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_config_equals_automl_hparams(name, hparams):
    ours, expected = _ours(_load_config(name)), _expected(hparams[name])
    assert ours.keys() == expected.keys()
    mismatches = {k: (ours[k], expected[k]) for k in ours if not _same(ours[k], expected[k])}
    assert not mismatches, f"{name}: ours vs automl: {mismatches}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fixed_behaviour_is_automls(name, hparams):
    h = hparams[name]
    wrong = {k: (h[k], value) for k, (value, _) in FIXED.items() if h[k] != value}
    assert not wrong, f"{name}: automl value vs the one implemented here: {wrong}"


def test_every_automl_key_is_compared_or_listed(hparams):
    compared = set(_expected(hparams["efficientdet-d0"]))
    listed = set(FIXED) | set(NOT_MODELLED) | set(DIFFERENT)
    assert not compared & listed, "a key is both compared and listed"
    for name, h in hparams.items():
        unknown = set(h) - compared - listed
        assert not unknown, f"{name}: automl keys neither compared nor listed: {sorted(unknown)}"
        nms_unknown = set(h["nms_configs"]) - set(NMS_KEYS)
        assert not nms_unknown, f"{name}: nms_configs keys not handled: {sorted(nms_unknown)}"
    # Every nms_configs key is compared (through _expected) or listed with its reason.
    nms_compared = {"method", "iou_thresh", "score_thresh", "sigma", "max_output_size"}
    assert set(NMS_KEYS) == nms_compared | {"max_nms_inputs", "pyfunc"}
    assert {"max_nms_inputs"} <= set(DIFFERENT) and "pyfunc" in NOT_MODELLED
    assert all(reason for _, reason in FIXED.values())
    assert all(NOT_MODELLED.values()) and all(DIFFERENT.values())
