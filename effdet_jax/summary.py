"""Model summary: parameters and multiply-adds per part, counted without running the network.

Multiply-adds are counted analytically from the shapes every convolution / dense layer sees (traced
with ``jax.eval_shape``, so even D7x at 1536 px costs no compute): conv ``H_out*W_out*k*k*C_in*C_out``,
depthwise ``H_out*W_out*k*k*C``, dense ``in*out``, per image. Element-wise work is not in ``macs``.

automl's published "FLOPs" (``utils.num_params_flops``: tfprof float ops // 2) also include element-wise
work. ``automl_flops`` approximates it as ``macs + 3/2 * (batch-normalised activations)``: inference BN
is a multiply and an add per element and the activation one more multiply. This lands within 0.2% of
automl's D0, D1 and D3 figures.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import jax
import jax.numpy as jnp
from flax import linen as nn

from effdet_jax.models.batch_norm import BatchNorm
from effdet_jax.models.layers import Conv2D, DepthwiseConv2D
from effdet_jax.models.layout import is_stacked_path, stack_length


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Counts for one model. ``params_by_part`` / ``macs_by_part`` are keyed by top-level module."""

    name: str
    image_size: tuple[int, int]
    params: int
    macs: int
    params_by_part: dict[str, int]
    macs_by_part: dict[str, int]
    bn_activations: int = 0

    @property
    def automl_flops(self) -> int:
        """Comparable to automl's reported FLOPs (see the module docstring)."""
        return self.macs + 3 * self.bn_activations // 2

    def format(self) -> str:
        lines = [f"{self.name} @ {self.image_size[0]}x{self.image_size[1]}",
                 f"{'part':<16}{'params':>14}{'MACs':>18}"]
        for part in self.params_by_part:
            lines.append(
                f"{part:<16}{self.params_by_part[part]:>14,}{self.macs_by_part.get(part, 0):>18,}"
            )
        lines.append(f"{'total':<16}{self.params:>14,}{self.macs:>18,}")
        lines.append(f"{'automl FLOPs':<16}{'':>14}{self.automl_flops:>18,}")
        return "\n".join(lines)


def _part(path: tuple[str, ...]) -> str:
    top = path[0] if path else "?"
    if top.startswith("fpn_cell") or top.startswith("resample_p"):
        return "fpn"
    return top


def summarize(model: nn.Module, image_size: tuple[int, int] | None = None) -> ModelSummary:
    """Parameters (the ``params`` collection) and multiply-adds per image of ``model``.

    Works for ``EfficientDet`` (parts: backbone, fpn, class_net, box_net) and ``EfficientNet``.
    """
    cfg = model.config
    if image_size is None:
        image_size = getattr(cfg, "image_size", None) or (cfg.resolution, cfg.resolution)
    x = jnp.zeros((1, *image_size, 3), jnp.float32)
    macs: dict[str, int] = defaultdict(int)
    bn_counts: dict[str, int] = defaultdict(int)
    scanned: dict[tuple[tuple[str, ...], int], tuple[dict, str, int]] = {}

    def add(counts: dict, path: tuple, value: int, repeats: int, shape: tuple) -> None:
        if is_stacked_path(path):
            # Keyed by input shape too: a head's scanned conv runs once per level (levels differ
            # in size: image_size >= 2**max_level), and each of those calls counts.
            scanned[(path, shape, id(counts))] = (counts, _part(path), value * repeats)
        else:
            counts[_part(path)] += value

    def count(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__":
            return out
        path = tuple(module.scope.path) if module.scope is not None else ()
        # A scanned body stands for all the repeats its stacked module holds, and flax may trace
        # it more than once: inside one, each module (called once per body) counts once per repeat.
        repeats = math.prod(stack_length(str(p)) or 1 for p in path)
        inp = args[0]
        if isinstance(module, DepthwiseConv2D):
            k = module.kernel_size
            add(macs, path, math.prod(out.shape[1:]) * k * k, repeats, inp.shape)
        elif isinstance(module, Conv2D):
            k = module.kernel_size
            add(macs, path, math.prod(out.shape[1:]) * k * k * inp.shape[-1], repeats, inp.shape)
        elif isinstance(module, BatchNorm):
            add(bn_counts, path, math.prod(out.shape[1:]), repeats, inp.shape)
        elif isinstance(module, nn.Dense):
            add(macs, path, inp.shape[-1] * out.shape[-1], repeats, inp.shape)
        return out

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    with nn.intercept_methods(count):
        jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
    for counts, part, value in scanned.values():
        counts[part] += value
    bn_activations = sum(bn_counts.values())
    params_by_part: dict[str, int] = defaultdict(int)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
        params_by_part[_part((path[0].key,))] += math.prod(leaf.shape)
    return ModelSummary(
        name=getattr(cfg, "name", type(model).__name__),
        image_size=tuple(image_size),
        params=sum(params_by_part.values()),
        macs=sum(macs.values()),
        params_by_part=dict(params_by_part),
        macs_by_part=dict(macs),
        bn_activations=bn_activations,
    )
