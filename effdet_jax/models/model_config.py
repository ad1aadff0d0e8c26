"""The one table of EfficientDet configurations (D0-D7, D7x, lite0-4, lite3x).

Values follow google/automl's ``hparams_config.py`` (and effdet's ``tf_efficientdet_*`` configs, which
mirror it). ``get_efficientdet_config(name, **overrides)`` is what the model, the configs in
``configs/`` and the trainer use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from effdet_jax.detection.anchors import AnchorConfig, num_anchors_per_location
from effdet_jax.models.bifpn import FUSION_METHODS
from effdet_jax.models.efficientnet_config import (
    DROP_CONNECT_VARIANTS,
    EfficientNetConfig,
    get_efficientnet_config,
)
from effdet_jax.models.layers import ACTIVATIONS
from effdet_jax.ops.policy import MODES as CPU_KERNEL_MODES
from effdet_jax.ops.policy import resolve as resolve_cpu_kernels

DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass recomputes instead of storing: nothing; each backbone MBConv block and
# BiFPN cell from its input; those and each head repeat (the body of the heads' scan) as well.
REMAT_POLICIES = ("none", "blocks", "blocks+heads")
# How each run of identical repeated blocks executes over its stacked variables
# (``models/layout.py``): one ``lax.scan`` body (compiled once), or unrolled after tracing.
LAYER_LOOPS = ("scan", "unrolled")

# Input normalisation ``(u8 - mean_rgb) / stddev_rgb`` per RGB channel, in uint8 pixel units as in
# automl's ``mean_rgb`` / ``stddev_rgb``: ImageNet statistics for D0-D7x, 127 / 128 for lite models.
IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)  # 255 * (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (58.395, 57.12, 57.375)  # 255 * (0.229, 0.224, 0.225)
LITE_MEAN_RGB = (127.0, 127.0, 127.0)
LITE_STDDEV_RGB = (128.0, 128.0, 128.0)
IMAGENET_NORMALIZATION = (IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB)
LITE_NORMALIZATION = (LITE_MEAN_RGB, LITE_STDDEV_RGB)

# name: backbone, image size, fpn filters, fpn cell repeats, head repeats, extra fields
_TABLE: dict[str, tuple[str, int, int, int, int, dict[str, Any]]] = {
    "efficientdet-d0": ("efficientnet-b0", 512, 64, 3, 3, {}),
    "efficientdet-d1": ("efficientnet-b1", 640, 88, 4, 3, {}),
    "efficientdet-d2": ("efficientnet-b2", 768, 112, 5, 3, {}),
    "efficientdet-d3": ("efficientnet-b3", 896, 160, 6, 4, {}),
    "efficientdet-d4": ("efficientnet-b4", 1024, 224, 7, 4, {}),
    "efficientdet-d5": ("efficientnet-b5", 1280, 288, 7, 4, {}),
    # D6+ use an unweighted sum for training stability.
    "efficientdet-d6": ("efficientnet-b6", 1280, 384, 8, 5, {"fpn_weight_method": "sum"}),
    "efficientdet-d7": (
        "efficientnet-b6", 1536, 384, 8, 5, {"fpn_weight_method": "sum", "anchor_scale": 5.0}
    ),
    "efficientdet-d7x": (
        "efficientnet-b7", 1536, 384, 8, 5, {"fpn_weight_method": "sum", "max_level": 8}
    ),
}
_LITE = {
    "activation": "relu6",
    "fpn_weight_method": "sum",
    "mean_rgb": LITE_MEAN_RGB,
    "stddev_rgb": LITE_STDDEV_RGB,
}
_TABLE |= {
    "efficientdet-lite0": ("efficientnet-lite0", 320, 64, 3, 3, {**_LITE, "anchor_scale": 3.0}),
    "efficientdet-lite1": ("efficientnet-lite1", 384, 88, 4, 3, {**_LITE, "anchor_scale": 3.0}),
    "efficientdet-lite2": ("efficientnet-lite2", 448, 112, 5, 3, {**_LITE, "anchor_scale": 3.0}),
    "efficientdet-lite3": ("efficientnet-lite3", 512, 160, 6, 4, dict(_LITE)),
    "efficientdet-lite3x": ("efficientnet-lite3", 640, 200, 6, 4, {**_LITE, "anchor_scale": 3.0}),
    "efficientdet-lite4": ("efficientnet-lite4", 640, 224, 7, 4, dict(_LITE)),
}
MODEL_NAMES = tuple(_TABLE)


@dataclasses.dataclass(frozen=True)
class EfficientDetConfig:
    """Everything that defines an EfficientDet. Override any field by name.

    Attributes:
      name: e.g. ``efficientdet-d3``.
      backbone_name: an EfficientNet name (``efficientnet-b3``).
      image_size: ``(height, width)`` of the network input in pixels.
      num_classes: class logits per anchor (90 for the COCO checkpoints: logit = category id - 1).
      min_level / max_level: pyramid levels (P3-P7; D7x goes to P8); min_level 2 adds the stride-4
        backbone feature (small objects), max_level below 5 drops the coarse ones.
      num_scales / aspect_ratios / anchor_scale: anchors per location = num_scales*len(aspect_ratios);
        aspect ratios are w/h scalars or (w, h) pairs.
      fpn_num_filters / fpn_cell_repeats / box_class_repeats: width and depths.
      fpn_weight_method: BiFPN fusion, one of ``bifpn.FUSION_METHODS``.
      activation: a key of ``layers.ACTIVATIONS`` (``swish``; ``relu6`` for lite), used in
        backbone, BiFPN and heads.
      separable_conv: BiFPN node conv separable (automl default) or a plain 3x3.
      mean_rgb / stddev_rgb: the input normalisation ``(u8 - mean_rgb) / stddev_rgb`` per RGB
        channel, in uint8 pixel units (automl's fields): the train and eval pipelines, prediction
        and the de-normalisation for drawing all read it from here (``normalization``).
      backbone_overrides: extra ``EfficientNetConfig`` fields for the backbone as (name, value) pairs,
        e.g. ``(("depth_coefficient", 0.25),)`` for a tiny test backbone.
      backbone_drop_connect_rate: automl sets 0 when ``b0`` is in the backbone name and keeps 0.2
        otherwise (lite0 included); reproduced (training only).
      drop_connect_variant: backbone drop-connect variant, one of
        ``efficientnet_config.DROP_CONNECT_VARIANTS``.
      head_drop_connect_rate: None = automl's default heads (no residual). A number adds automl's head
        residual for repeats after the first, with that drop-connect rate in training.
      dtype: computation dtype name; params, BN statistics and outputs stay float32.
      cpu_kernels: the hand-written XLA:CPU kernels, ``auto`` (on CPU where they build) | ``off``
        (XLA's own ops on every platform) | ``require`` (error naming why they cannot be built);
        ``None``: ``$EFFDET_JAX_CPU_KERNELS``, else ``auto`` (``effdet_jax.ops.policy``).
      remat: what the backward pass recomputes, one of ``REMAT_POLICIES``: ``none``, ``blocks``
        (backbone blocks and BiFPN cells) or ``blocks+heads`` (and each head repeat);
        ``True`` / ``False`` mean ``blocks`` / ``none``.
      layer_loop: one of ``LAYER_LOOPS``: ``scan`` runs each stage's repeated backbone blocks, the
        BiFPN cells after the first and the heads' repeats as one ``lax.scan`` each (each body
        compiled once); ``unrolled``
        unrolls those scans after tracing (a longer compile). Same variables either way.
    """

    name: str = "efficientdet-d0"
    backbone_name: str = "efficientnet-b0"
    image_size: tuple[int, int] = (512, 512)
    num_classes: int = 90
    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    aspect_ratios: tuple = (1.0, 2.0, 0.5)
    anchor_scale: float | tuple[float, ...] = 4.0
    fpn_num_filters: int = 64
    fpn_cell_repeats: int = 3
    box_class_repeats: int = 3
    fpn_weight_method: str = "fastattn"
    activation: str = "swish"
    separable_conv: bool = True
    mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB
    stddev_rgb: tuple[float, float, float] = IMAGENET_STDDEV_RGB
    backbone_overrides: tuple[tuple[str, Any], ...] = ()
    backbone_drop_connect_rate: float = 0.0
    drop_connect_variant: str = "sample"
    head_drop_connect_rate: float | None = None
    dtype: str = "float32"
    cpu_kernels: str | None = None
    remat: str = "none"
    layer_loop: str = "scan"

    def __post_init__(self):
        if isinstance(self.backbone_overrides, dict):
            object.__setattr__(self, "backbone_overrides", tuple(self.backbone_overrides.items()))
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "blocks" if self.remat else "none")
        if isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", (self.image_size, self.image_size))
        else:
            object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(
            self,
            "aspect_ratios",
            tuple(tuple(a) if isinstance(a, (list, tuple)) else float(a) for a in self.aspect_ratios),
        )
        for key in ("mean_rgb", "stddev_rgb"):
            value = getattr(self, key)
            value = (value,) * 3 if isinstance(value, (int, float)) else value
            if len(value) != 3:
                raise ValueError(f"{key}={value!r} must have one value per RGB channel (3)")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        if min(self.stddev_rgb) <= 0:
            raise ValueError(f"stddev_rgb={self.stddev_rgb!r} must be positive")
        checks = [
            ("fpn_weight_method", self.fpn_weight_method, FUSION_METHODS),
            ("drop_connect_variant", self.drop_connect_variant, DROP_CONNECT_VARIANTS),
            ("dtype", self.dtype, DTYPES),
            ("activation", self.activation, tuple(ACTIVATIONS)),
            ("remat", self.remat, REMAT_POLICIES),
            ("layer_loop", self.layer_loop, LAYER_LOOPS),
        ]
        if self.cpu_kernels is not None:
            checks.append(("cpu_kernels", self.cpu_kernels, CPU_KERNEL_MODES))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{key}={value!r} is not allowed; choose one of {allowed}")
        if self.cpu_kernels == "require":
            resolve_cpu_kernels("require")  # raises here, naming why, when they cannot be built
        if not 2 <= self.min_level <= 5 or self.max_level < self.min_level + 1:
            raise ValueError(
                f"levels {self.min_level}..{self.max_level}: min_level must be 2..5 (the backbone "
                "gives P2-P5; higher levels are pooled from P5) and max_level > min_level"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if min(self.image_size) < 32:
            raise ValueError(f"image_size {self.image_size} is too small; use at least 32 pixels")

    def backbone_config(self) -> EfficientNetConfig:
        """The EfficientNet feature extractor this detector uses."""
        return get_efficientnet_config(
            self.backbone_name,
            drop_connect_rate=self.backbone_drop_connect_rate,
            drop_connect_variant=self.drop_connect_variant,
            activation=self.activation,
            **dict(self.backbone_overrides),
        )

    @property
    def normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """``(mean_rgb, stddev_rgb)``: what the input pipelines normalise images with."""
        return self.mean_rgb, self.stddev_rgb

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    def anchor_config(self) -> AnchorConfig:
        """The anchor layout this model predicts for (one place for feature sizes and counts)."""
        return AnchorConfig(
            min_level=self.min_level,
            max_level=self.max_level,
            num_scales=self.num_scales,
            aspect_ratios=self.aspect_ratios,
            anchor_scale=self.anchor_scale,
            image_size=self.image_size,
        )

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location."""
        return num_anchors_per_location(self.anchor_config())

    def feature_sizes(self) -> dict[int, tuple[int, int]]:
        """(height, width) of each level min..max."""
        return self.anchor_config().feature_sizes()


def get_efficientdet_config(name: str = "efficientdet-d0", **overrides) -> EfficientDetConfig:
    """Config of a named model with any field overridden; unknown names/fields raise ValueError."""
    if name not in _TABLE:
        raise ValueError(f"unknown EfficientDet {name!r}; known: {list(MODEL_NAMES)}")
    backbone, size, filters, cells, heads, extra = _TABLE[name]
    fields = dict(
        name=name,
        backbone_name=backbone,
        image_size=size,
        fpn_num_filters=filters,
        fpn_cell_repeats=cells,
        box_class_repeats=heads,
        # automl quirk: only b0 backbones get survival_prob 0 (drop-connect off).
        backbone_drop_connect_rate=0.0 if "b0" in backbone else 0.2,
        **extra,
    )
    if "depthwise_impl" in overrides:
        raise ValueError(
            "depthwise_impl is no longer a model config field: the depthwise implementation follows "
            "cpu_kernels ('auto' | 'off' | 'require'; 'off' is XLA's grouped convolution, as "
            "depthwise_impl='lax' was), e.g. --config.model.overrides.cpu_kernels=off"
        )
    known = {f.name for f in dataclasses.fields(EfficientDetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown EfficientDet config field(s) {unknown}; known: {sorted(known)}")
    fields.update(overrides)
    return EfficientDetConfig(**fields)
