"""Class and box prediction heads: conv weights shared across pyramid levels, BN per level.

Input: dict level -> ``[batch, h_l, w_l, fpn_filters]``. Output: a list over levels min..max of
``[batch, h_l, w_l, num_anchors * num_outputs]`` raw values (class logits or box deltas ty, tx, th,
tw), anchor-major then output, as automl lays them out.

Parameter tree: ``repeats_0_to_{R-1}`` (the ``R`` repeats as one ``nn.scan``, ``models/layout.py``):
``conv`` (the separable conv every level shares) and ``bn_p{l}`` (level ``l``'s BN), every leaf
stacked ``[R, ...]``; ``predict`` (the separable predict conv, shared).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effdet_jax.models.efficientnet import drop_connect
from effdet_jax.models.layers import SeparableConv2D, activation_fn, batch_norm
from effdet_jax.models.layout import HEAD_CONV, head_bn_name, scanned_stack, stacked_head_name

Dtype = Any
# automl's heads use Keras' variance_scaling() default: scale 1, fan_in, truncated normal.
head_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
head_depthwise_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2
)
CLASS_PRIOR = 0.01


def head_separable_conv(features: int, name: str, dtype: Dtype, **kwargs: Any) -> SeparableConv2D:
    """automl's head conv: separable 3x3 with the heads' initialisers."""
    return SeparableConv2D(
        features, 3, dtype=dtype,
        depthwise_kernel_init=head_depthwise_init, pointwise_kernel_init=head_init,
        name=name, **kwargs,
    )


class HeadRepeat(nn.Module):
    """One repeat of a head as an ``nn.scan`` body: on every level, the shared separable conv, then
    the level's BN and activation; with ``drop_connect_rate`` set (not None), plus automl's residual
    where the scan input says so (repeats after the first), the branch dropped in training with the
    input's keep probability.

    Carry: a tuple over levels min..max of ``[batch, h_l, w_l, features]``. Scan input
    ``(keep_prob, residual)``: float32 and bool scalars for this repeat (None without drop connect).
    """

    features: int
    min_level: int
    max_level: int
    activation: str = "swish"
    drop_connect_rate: float | None = None
    drop_connect_variant: str = "sample"
    dtype: Dtype = jnp.float32
    train: bool = False

    @nn.compact
    def __call__(self, feats: tuple[jax.Array, ...],
                 xs: tuple[jax.Array, jax.Array] | None) -> tuple[tuple[jax.Array, ...], None]:
        act = activation_fn(self.activation)
        conv = head_separable_conv(self.features, HEAD_CONV, self.dtype)
        out = []
        for lvl, x in zip(range(self.min_level, self.max_level + 1), feats, strict=True):
            y = batch_norm(self.train, head_bn_name(lvl), self.dtype, activation=act)(conv(x))
            if self.drop_connect_rate is not None:
                keep_prob, residual = xs
                if self.train and self.drop_connect_rate > 0:
                    y = drop_connect(y, self.drop_connect_rate, self.drop_connect_variant,
                                     self.make_rng("dropout"), keep_prob)
                y = jnp.where(residual, y + x, y)
            out.append(y)
        return tuple(out), None


class PredictionHead(nn.Module):
    """``repeats`` x (separable conv [shared] -> BN [per level] -> activation), then a separable
    predict conv [shared].

    The repeats run as one ``nn.scan`` (``HeadRepeat``, compiled once); ``remat``: recompute each
    repeat in the backward pass; ``unrolled``: no loop after tracing (``layout.scan_unroll``).
    With ``drop_connect_rate`` set (not None), repeats after the first add automl's residual and drop
    the branch with that rate during training (``rng`` collection ``dropout``).
    """

    num_outputs: int
    num_anchors: int
    features: int
    repeats: int
    min_level: int
    max_level: int
    activation: str = "swish"
    bias_prior: float | None = None
    drop_connect_rate: float | None = None
    drop_connect_variant: str = "sample"
    dtype: Dtype = jnp.float32
    remat: bool = False
    unrolled: bool = False

    @nn.compact
    def __call__(self, feats: dict[int, jax.Array], train: bool = False) -> list[jax.Array]:
        levels = range(self.min_level, self.max_level + 1)
        xs = tuple(feats[lvl] for lvl in levels)
        if self.repeats > 0:
            body_kwargs = dict(
                features=self.features, min_level=self.min_level, max_level=self.max_level,
                activation=self.activation, drop_connect_rate=self.drop_connect_rate,
                drop_connect_variant=self.drop_connect_variant, dtype=self.dtype,
            )
            scan_inputs = None
            if self.drop_connect_rate is not None:
                # Repeat 0 has no residual and drops nothing: keep probability 1, residual off.
                keep = np.full(self.repeats, 1.0 - self.drop_connect_rate, np.float32)
                keep[0] = 1.0
                scan_inputs = (jnp.asarray(keep), jnp.arange(self.repeats) > 0)
            xs, _ = scanned_stack(
                HeadRepeat, body_kwargs, self.repeats, train, self.remat, self.unrolled,
                stacked_head_name(0, self.repeats - 1),
            )(xs, scan_inputs)
        bias_init = nn.initializers.zeros
        if self.bias_prior is not None:
            bias_init = nn.initializers.constant(-math.log((1 - self.bias_prior) / self.bias_prior))
        predict = head_separable_conv(self.num_anchors * self.num_outputs, "predict", self.dtype,
                                      bias_init=bias_init)
        return [predict(x).astype(jnp.float32) for x in xs]
