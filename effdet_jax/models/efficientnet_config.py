"""The one table of EfficientNet configurations (B0-B7, lite0-4) and the official scaling rules."""

from __future__ import annotations

import dataclasses
import math

# Stage table of EfficientNet-B0 (Tan & Le 2019, table 1): repeats, kernel, stride, expand ratio,
# input filters, output filters, squeeze-excitation ratio.
BlockArgs = tuple[int, int, int, int, int, int, float]
B0_BLOCKS: tuple[BlockArgs, ...] = (
    (1, 3, 1, 1, 32, 16, 0.25),
    (2, 3, 2, 6, 16, 24, 0.25),
    (2, 5, 2, 6, 24, 40, 0.25),
    (3, 3, 2, 6, 40, 80, 0.25),
    (3, 5, 1, 6, 80, 112, 0.25),
    (4, 5, 2, 6, 112, 192, 0.25),
    (1, 3, 1, 6, 192, 320, 0.25),
)

# name: (width coefficient, depth coefficient, resolution, dropout rate)
COMPOUND_COEFFICIENTS: dict[str, tuple[float, float, int, float]] = {
    "efficientnet-b0": (1.0, 1.0, 224, 0.2),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5),
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3),
}

DROP_CONNECT_VARIANTS = ("none", "sample", "channel", "element", "weight")


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
    """Everything that defines an EfficientNet variant. Override any field by name.

    Attributes:
      name: e.g. ``efficientnet-b3``.
      width_coefficient / depth_coefficient: compound scaling of filters and repeats.
      resolution: native input size (square).
      dropout_rate: dropout before the classifier.
      drop_connect_rate: residual-branch drop rate of the last block; block i of N uses
        ``rate * i / N`` (the official linear schedule over the flat block index).
      drop_connect_variant: ``sample`` (noise ``(N,1,1,1)``, the official), ``channel`` (``(N,1,1,C)``),
        ``element`` (``(N,H,W,C)``), ``weight`` (DropConnect on the projection kernel) or ``none``.
      activation: ``swish`` (B*) or ``relu6`` (lite).
      use_se: squeeze-excitation (lite drops it).
      fix_head_stem: lite keeps stem (32) / head (1280) widths and the first/last stage repeats fixed.
      depth_divisor / min_depth: for ``round_filters``.
      blocks: stage table (see ``B0_BLOCKS``).
    """

    name: str = "efficientnet-b0"
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    resolution: int = 224
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    drop_connect_variant: str = "sample"
    activation: str = "swish"
    use_se: bool = True
    fix_head_stem: bool = False
    depth_divisor: int = 8
    min_depth: int | None = None
    stem_filters: int = 32
    head_filters: int = 1280
    blocks: tuple[BlockArgs, ...] = B0_BLOCKS

    def __post_init__(self):
        if self.drop_connect_variant not in DROP_CONNECT_VARIANTS:
            raise ValueError(
                f"drop_connect_variant={self.drop_connect_variant!r} is not one of "
                f"{DROP_CONNECT_VARIANTS}"
            )
        if not 0.0 <= self.drop_connect_rate < 1.0:
            raise ValueError(f"drop_connect_rate must be in [0, 1), got {self.drop_connect_rate}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def round_filters(self, filters: int, skip: bool = False) -> int:
        """Official ``round_filters``: scale by the width coefficient, round to the divisor."""
        if skip or not self.width_coefficient:
            return filters
        scaled = filters * self.width_coefficient
        min_depth = self.min_depth or self.depth_divisor
        d = self.depth_divisor
        new = max(min_depth, int(scaled + d / 2) // d * d)
        if new < 0.9 * scaled:  # never round down by more than 10%
            new += d
        return int(new)

    def round_repeats(self, repeats: int) -> int:
        return int(math.ceil(self.depth_coefficient * repeats))

    def expanded_blocks(self) -> list[dict]:
        """The flat list of MBConv blocks after scaling: one dict per block with keys
        kernel, stride, expand_ratio, filters_in, filters_out, se_ratio, stage."""
        out = []
        last = len(self.blocks) - 1
        for stage, (repeats, kernel, stride, expand, f_in, f_out, se) in enumerate(self.blocks):
            f_in, f_out = self.round_filters(f_in), self.round_filters(f_out)
            if self.fix_head_stem and stage in (0, last):
                n = repeats
            else:
                n = self.round_repeats(repeats)
            for r in range(n):
                out.append(
                    dict(
                        kernel=kernel,
                        stride=stride if r == 0 else 1,
                        expand_ratio=expand,
                        filters_in=f_in if r == 0 else f_out,
                        filters_out=f_out,
                        se_ratio=se if self.use_se else 0.0,
                        stage=stage,
                    )
                )
        return out


def get_efficientnet_config(name: str, **overrides) -> EfficientNetConfig:
    """Config of a named variant, with any field overridden (unknown names raise)."""
    if name not in COMPOUND_COEFFICIENTS:
        raise ValueError(f"unknown EfficientNet {name!r}; known: {sorted(COMPOUND_COEFFICIENTS)}")
    width, depth, resolution, dropout = COMPOUND_COEFFICIENTS[name]
    fields = dict(
        name=name,
        width_coefficient=width,
        depth_coefficient=depth,
        resolution=resolution,
        dropout_rate=dropout,
    )
    if "lite" in name:
        fields.update(activation="relu6", use_se=False, fix_head_stem=True)
    known = {f.name for f in dataclasses.fields(EfficientNetConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown EfficientNet config field(s) {unknown}; known: {sorted(known)}")
    fields.update(overrides)
    return EfficientNetConfig(**fields)
