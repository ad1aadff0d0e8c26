"""BiFPN (Tan et al. 2020): the node graph, feature resampling and weighted fusion.

Feature maps are NHWC ``[batch, h_l, w_l, channels]``, keyed by pyramid level. Every node resamples
each input to its own size (1x1 conv + BN when channels differ, then max-pool down or nearest-neighbour
up), fuses them by a weighted sum, then applies activation -> separable 3x3 conv -> BN (automl's
``conv_bn_act_pattern=False``: no activation after the BN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from effdet_jax.models.layers import (
    Conv2D,
    SeparableConv2D,
    activation_fn,
    batch_norm,
)
from effdet_jax.models.layout import scanned_stack
from effdet_jax.ops.pool import max_pool_same
from effdet_jax.ops.resize import resize_nearest_legacy

Dtype = Any
# Keras' default (glorot uniform) initialiser, which automl's BiFPN convs use.
glorot = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
glorot_depthwise = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-1, out_axis=-2)

FUSION_EPSILON = 1e-4
# The values of ``fpn_weight_method`` (automl's names); ``fuse`` documents each.
FUSION_METHODS = ("sum", "attn", "fastattn", "channel_attn", "channel_fastattn")


def bifpn_nodes(min_level: int, max_level: int) -> list[tuple[int, tuple[int, ...]]]:
    """automl's BiFPN graph: a list of ``(level, input ids)``.

    Ids ``0 .. num_levels-1`` are the cell inputs P_min..P_max; node ``k`` creates id
    ``num_levels + k``. A top-down pass (each level from its latest node and the level above) is
    followed by a bottom-up pass (each level from all its nodes so far and the level below).
    """
    latest = {lvl: [lvl - min_level] for lvl in range(min_level, max_level + 1)}
    next_id = max_level - min_level + 1
    nodes = []
    for lvl in range(max_level - 1, min_level - 1, -1):
        nodes.append((lvl, (latest[lvl][-1], latest[lvl + 1][-1])))
        latest[lvl].append(next_id)
        next_id += 1
    for lvl in range(min_level + 1, max_level + 1):
        nodes.append((lvl, (*latest[lvl], latest[lvl - 1][-1])))
        latest[lvl].append(next_id)
        next_id += 1
    return nodes


def fuse(nodes: list[jax.Array], weights: jax.Array | None, method: str) -> jax.Array:
    """Weighted fusion of same-shaped NHWC inputs.

    ``weights`` is ``[num_inputs]`` (scalar methods) or ``[num_inputs, channels]`` (channel_*):
      sum: plain sum. attn: softmax over the inputs. fastattn: ``sum_i x_i relu(w_i) /
      (sum_j relu(w_j) + 1e-4)``, evaluated per input then added in order as automl does.
    """
    if method == "sum":
        out = nodes[0]
        for x in nodes[1:]:
            out = out + x
        return out
    weights = weights.astype(nodes[0].dtype)
    if method in ("attn", "channel_attn"):
        w = jax.nn.softmax(weights, axis=0)
        return sum(x * w[i] for i, x in enumerate(nodes))
    if method in ("fastattn", "channel_fastattn"):
        w = nn.relu(weights)
        total = jnp.sum(w, axis=0) + FUSION_EPSILON
        out = None
        for i, x in enumerate(nodes):
            term = x * w[i] / total
            out = term if out is None else out + term
        return out
    raise ValueError(f"unknown fusion method {method!r}; allowed: {FUSION_METHODS}")


class ResampleFeature(nn.Module):
    """Bring a feature map to ``target_size`` and ``features`` channels.

    1x1 conv (with automl's redundant bias) + BN when the channels differ, applied before
    down-sampling (automl's ``conv_after_downsample=False``); max-pool (kernel stride+1, TF SAME) to go
    down, legacy nearest-neighbour to go up. No activation.
    """

    features: int
    target_size: tuple[int, int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if x.shape[-1] != self.features:
            x = Conv2D(self.features, 1, use_bias=True, dtype=self.dtype, kernel_init=glorot,
                       name="conv")(x)
            x = batch_norm(train, "bn", self.dtype)(x)
        h, w = x.shape[1], x.shape[2]
        th, tw = self.target_size
        if h > th and w > tw:
            sh, sw = (h - 1) // th + 1, (w - 1) // tw + 1
            if sh != sw:
                raise ValueError(f"non-square pooling {sh}x{sw} from {(h, w)} to {(th, tw)}")
            x = max_pool_same(x, window=sh + 1, stride=sh)
        elif h < th or w < tw:
            x = resize_nearest_legacy(x, th, tw)
        return x


class BiFPNCell(nn.Module):
    """One BiFPN layer over levels min..max. Input and output: dict level -> NHWC features."""

    min_level: int
    max_level: int
    features: int
    feature_sizes: dict[int, tuple[int, int]]
    weight_method: str = "fastattn"
    activation: str = "swish"
    separable_conv: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array], train: bool = False) -> dict[int, jax.Array]:
        return self._body(feats, train)

    def _body(self, feats: dict[int, jax.Array], train: bool) -> dict[int, jax.Array]:
        act = activation_fn(self.activation)
        levels = list(range(self.min_level, self.max_level + 1))
        graph = bifpn_nodes(self.min_level, self.max_level)
        num_levels = len(levels)
        values = [feats[lvl] for lvl in levels]
        value_levels = list(levels)
        for k, (lvl, inputs) in enumerate(graph):
            node_id = num_levels + k
            size = self.feature_sizes[lvl]
            resampled = [
                ResampleFeature(self.features, size, self.dtype,
                                name=f"node_{k}_resample_{i}_{src}")(values[src], train)
                for i, src in enumerate(inputs)
            ]
            weights = None
            if self.weight_method in ("attn", "fastattn"):
                weights = self.param(f"node_{k}_fusion", nn.initializers.ones, (len(inputs),))
            elif self.weight_method in ("channel_attn", "channel_fastattn"):
                weights = self.param(
                    f"node_{k}_fusion", nn.initializers.ones, (len(inputs), self.features)
                )
            x = act(fuse(resampled, weights, self.weight_method))
            if self.separable_conv:
                x = SeparableConv2D(
                    self.features, 3, dtype=self.dtype,
                    depthwise_kernel_init=glorot_depthwise, pointwise_kernel_init=glorot,
                    name=f"node_{k}_conv",
                )(x)
            else:
                x = Conv2D(self.features, 3, use_bias=True, dtype=self.dtype, kernel_init=glorot,
                           name=f"node_{k}_conv")(x)
            x = batch_norm(train, f"node_{k}_bn", self.dtype)(x)
            assert node_id == len(values)
            values.append(x)
            value_levels.append(lvl)
        # Each level's output is its latest node.
        out = {}
        for node_value, lvl in zip(values, value_levels, strict=True):
            out[lvl] = node_value
        return out


class ScannedBiFPNCell(BiFPNCell):
    """One of the identical cells after the first (inputs already ``features`` wide, so no resample
    convs) as an ``nn.scan`` body: the level -> features dict is the carry; ``train`` an attribute."""

    train: bool = False

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array], _: None = None) -> tuple[dict[int, jax.Array], None]:
        return self._body(feats, self.train), None


def scanned_cells(cell_kwargs: dict, length: int, train: bool, remat: bool, unrolled: bool,
                  name: str) -> Callable[[dict[int, jax.Array]], dict[int, jax.Array]]:
    """``feats -> feats`` running ``length`` identical ``BiFPNCell(**cell_kwargs)`` as one
    ``nn.scan`` over stacked variables (leading axis: the repeat), named ``name``; ``unrolled``:
    no loop after tracing (``layout.scan_unroll``)."""
    module = scanned_stack(ScannedBiFPNCell, cell_kwargs, length, train, remat, unrolled, name)
    return lambda feats: module(feats, None)[0]
