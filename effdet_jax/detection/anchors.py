"""Multi-level anchor boxes, exactly as google/automl builds them (``anchors.Anchors``).

Anchors are ``[y_min, x_min, y_max, x_max]`` in input-image pixels, flattened in automl's order:
level (``min_level..max_level``), then feature-map row ``y``, then column ``x``, then octave
scale, then aspect ratio. This is exactly the order of ``reshape(out_L, [B, H*W*A, K])``
concatenated over levels (see :func:`effdet_jax.detection.targets.flatten_level_outputs`).

The boxes are computed on the host in float64 and cast to float32, like automl, so under ``jax.jit``
they are a compile-time constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

AspectRatio = float | tuple[float, float]


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """How anchors are laid out (automl's ``min_level``, ``max_level``, ``num_scales``, ...).

    Attributes:
      min_level, max_level: pyramid levels; level ``L`` has stride about ``2**L``.
      num_scales: octave scales per location, ``2**(i/num_scales)`` for ``i < num_scales``.
      aspect_ratios: either ``(x, y)`` multiplier pairs like automl's default
        ``((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))``, or scalar ``w/h`` ratios like automl's
        ``[1.0, 2.0, 0.5]`` (a scalar ``a`` means ``(sqrt(a), 1/sqrt(a))``).
      anchor_scale: base anchor size in strides; a float or one float per level.
      image_size: input size, ``int`` (square) or ``(height, width)``.
    """

    min_level: int = 3
    max_level: int = 7
    num_scales: int = 3
    aspect_ratios: tuple[AspectRatio, ...] = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))
    anchor_scale: float | tuple[float, ...] = 4.0
    image_size: int | tuple[int, int] = 512

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so the config stays hashable (a jit static argument).
        ratios = tuple(
            tuple(float(v) for v in r) if isinstance(r, Sequence) else float(r)
            for r in self.aspect_ratios
        )
        object.__setattr__(self, "aspect_ratios", ratios)
        if isinstance(self.anchor_scale, Sequence):
            scales = tuple(float(s) for s in self.anchor_scale)
            if len(scales) != self.num_levels:
                raise ValueError(f"anchor_scale needs {self.num_levels} values, got {scales}")
            object.__setattr__(self, "anchor_scale", scales)
        if not isinstance(self.image_size, int):
            object.__setattr__(self, "image_size", _as_hw(self.image_size))
        if not 0 <= self.min_level <= self.max_level:
            raise ValueError(f"bad levels {self.min_level}..{self.max_level}")

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def image_hw(self) -> tuple[int, int]:
        return _as_hw(self.image_size)

    def level_anchor_scale(self, level: int) -> float:
        if isinstance(self.anchor_scale, tuple):
            return self.anchor_scale[level - self.min_level]
        return float(self.anchor_scale)

    def feature_sizes(self) -> dict[int, tuple[int, int]]:
        """``{level: (height, width)}``: each level halves the previous one as ``(s-1)//2+1``
        (what a stride-2 'SAME' conv/pool gives), starting from the image at level 0."""
        h, w = self.image_hw
        sizes = {0: (h, w)}
        for level in range(1, self.max_level + 1):
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            sizes[level] = (h, w)
        return {lvl: sizes[lvl] for lvl in range(self.min_level, self.max_level + 1)}


def num_anchors_per_location(cfg: AnchorConfig) -> int:
    """Anchors at each feature-map cell: ``num_scales * len(aspect_ratios)``."""
    return cfg.num_scales * len(cfg.aspect_ratios)


def num_anchors_per_level(cfg: AnchorConfig) -> dict[int, int]:
    """``{level: H*W*A}``, the number of flattened anchor rows of each level."""
    a = num_anchors_per_location(cfg)
    return {lvl: h * w * a for lvl, (h, w) in cfg.feature_sizes().items()}


def num_anchors(cfg: AnchorConfig) -> int:
    """Total number of anchors over all levels."""
    return sum(num_anchors_per_level(cfg).values())


def _aspect_multipliers(aspect: AspectRatio) -> tuple[float, float]:
    if isinstance(aspect, tuple):
        return aspect
    x = math.sqrt(aspect)
    return x, 1.0 / x


@functools.lru_cache(maxsize=32)
def _anchors_cached(cfg: AnchorConfig) -> np.ndarray:
    image_h, image_w = cfg.image_hw
    per_level = []
    for level, (feat_h, feat_w) in cfg.feature_sizes().items():
        # Stride as a float (e.g. 320/3 = 106.67 for lite0's P7), like automl.
        stride_y, stride_x = image_h / feat_h, image_w / feat_w
        ys = np.arange(stride_y / 2, image_h, stride_y, dtype=np.float64)
        xs = np.arange(stride_x / 2, image_w, stride_x, dtype=np.float64)
        yv, xv = np.meshgrid(ys, xs, indexing="ij")  # [H, W], row-major (y, x)
        cell = []
        for octave in range(cfg.num_scales):
            octave_scale = 2.0 ** (octave / cfg.num_scales)
            base_x = cfg.level_anchor_scale(level) * stride_x * octave_scale
            base_y = cfg.level_anchor_scale(level) * stride_y * octave_scale
            for aspect in cfg.aspect_ratios:
                mult_x, mult_y = _aspect_multipliers(aspect)
                half_x, half_y = base_x * mult_x / 2.0, base_y * mult_y / 2.0
                cell.append(np.stack([yv - half_y, xv - half_x, yv + half_y, xv + half_x], -1))
        # [H, W, A, 4] -> rows in (y, x, octave, aspect) order.
        per_level.append(np.stack(cell, axis=2).reshape(-1, 4))
    boxes = np.concatenate(per_level, axis=0).astype(np.float32)
    boxes.setflags(write=False)
    return boxes


def generate_anchors(cfg: AnchorConfig) -> np.ndarray:
    """All anchors, ``[num_anchors, 4]`` float32 yxyx input pixels, in automl's order.

    Computed in float64 then cast (as automl does); cached per config and read-only.
    """
    return _anchors_cached(cfg)
