"""EfficientNet B0-B7 and lite0-4 (Tan & Le 2019) in flax.linen, numerically the official model.

Input: ``[batch, height, width, 3]`` float, already normalised. Output: classifier logits
``[batch, num_classes]`` (softmax is the loss's job), or with ``features_only`` the endpoints
``{2: ..., 4: ..., 8: ..., 16: ..., 32: ...}`` keyed by stride, each ``[batch, h, w, c]`` (the official
``reduction_i`` endpoints: the last block output before each stride change).

Parameter tree (names say what a thing is): ``stem_conv``, ``stem_bn``; per stage its first block
``block_{i}`` (flat index) and, when the stage has more, ``blocks_{a}_to_{b}``: the stage's other
blocks ``a..b`` run as one ``nn.scan``, every leaf stacked ``[b - a + 1, ...]``
(``effdet_jax.models.layout``). A block has ``expand_conv``/``expand_bn`` (absent when expand ratio
is 1), ``depthwise_conv``/``depthwise_bn``, ``se_reduce``/``se_expand`` (with bias),
``project_conv``/``project_bn``; then ``head_conv``/``head_bn`` and ``classifier`` (not built with
``features_only``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from effdet_jax.models.efficientnet_config import EfficientNetConfig, get_efficientnet_config
from effdet_jax.models.layers import (
    Conv2D,
    DepthwiseConv2D,
    activation_fn,
    batch_norm,
    dense_kernel_init,
)
from effdet_jax.models.layout import scanned_stack, stacked_block_name, stage_runs
from effdet_jax.ops.policy import cpu_kernels

Dtype = Any


def drop_connect(
    x: jax.Array, rate: float, variant: str, rng: jax.Array, keep_prob: jax.Array | None = None
) -> jax.Array:
    """Drop the residual branch ``x`` ``[N, H, W, C]`` and rescale by 1/(1-rate) so that the
    expected value is unchanged.

    ``sample`` draws one keep decision per example (noise shape ``(N,1,1,1)``, the official),
    ``channel`` one per example and channel ``(N,1,1,C)``, ``element`` one per activation.
    ``keep_prob``: a traced ``1 - rate`` (float32 scalar, a scan input) used instead of ``rate``.
    """
    if variant in ("none", "weight") or (keep_prob is None and rate == 0.0):
        return x
    if keep_prob is None:
        keep_prob = 1.0 - rate
    n, _, _, c = x.shape
    shape = {
        "sample": (n, 1, 1, 1),
        "channel": (n, 1, 1, c),
        "element": x.shape,
    }[variant]
    keep = jax.random.bernoulli(rng, keep_prob, shape)
    # A Python rate enters the division weakly typed, i.e. in x's dtype: so does a traced one.
    scale = keep_prob if isinstance(keep_prob, float) else jnp.asarray(keep_prob).astype(x.dtype)
    return jnp.where(keep, x / scale, jnp.zeros_like(x))


def block_drop_rate(config: EfficientNetConfig, i: int) -> float:
    """Drop-connect rate of flat block ``i`` of N: ``drop_connect_rate * i / N`` (automl's linear
    schedule over the flat block index)."""
    return config.drop_connect_rate * i / len(config.expanded_blocks())


class SqueezeExcite(nn.Module):
    """Spatial mean -> 1x1 conv (reduce, bias) -> activation -> 1x1 conv (expand, bias) -> sigmoid
    gate. ``reduced`` is ``max(1, int(block_filters_in * se_ratio))``."""

    reduced: int
    activation: str = "swish"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = Conv2D(self.reduced, use_bias=True, dtype=self.dtype, name="se_reduce")(s)
        s = activation_fn(self.activation)(s)
        s = Conv2D(x.shape[-1], use_bias=True, dtype=self.dtype, name="se_expand")(s)
        return x * jax.nn.sigmoid(s)


class MBConvBlock(nn.Module):
    """Inverted residual block: [expand 1x1 -> BN -> act] -> depthwise -> BN -> act -> [SE] ->
    project 1x1 -> BN (no activation) -> [drop-connect + residual add, nothing after]."""

    kernel: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int
    se_ratio: float
    activation: str = "swish"
    drop_rate: float = 0.0
    drop_variant: str = "sample"
    dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        return self._body(inputs, train, None)

    def _body(self, inputs: jax.Array, train: bool, keep_prob: jax.Array | None) -> jax.Array:
        """The block; ``keep_prob`` (a traced ``1 - drop rate``, scan input) replaces
        ``drop_rate``'s value, while ``drop_rate > 0`` still decides whether anything is dropped."""
        act = activation_fn(self.activation)
        bn = lambda name, activation=None: batch_norm(  # noqa: E731
            train, name, self.dtype, self.axis_name, activation
        )
        x = inputs
        if self.expand_ratio != 1:
            x = Conv2D(self.filters_in * self.expand_ratio, dtype=self.dtype, name="expand_conv")(x)
            x = bn("expand_bn", act)(x)
        x = DepthwiseConv2D(
            self.kernel, self.stride, self.dtype, name="depthwise_conv"
        )(x)
        x = bn("depthwise_bn", act)(x)
        if self.se_ratio:
            reduced = max(1, int(self.filters_in * self.se_ratio))
            x = SqueezeExcite(reduced, self.activation, self.dtype, name="se")(x)
        weight_rate = self.drop_rate if self.drop_variant == "weight" else 0.0
        x = Conv2D(
            self.filters_out, dtype=self.dtype, weight_drop_rate=weight_rate, name="project_conv"
        )(x, train=train, keep_prob=keep_prob)
        x = bn("project_bn")(x)
        if self.stride == 1 and self.filters_in == self.filters_out:
            if train and self.drop_rate > 0.0:
                x = drop_connect(x, self.drop_rate, self.drop_variant, self.make_rng("dropout"),
                                 keep_prob)
            x = x + inputs
        return x


class ScannedMBConvBlock(MBConvBlock):
    """One repeat of a stage's identical blocks as an ``nn.scan`` body: carry ``[N, H, W, C]`` in
    and out, the block's keep probability ``1 - drop rate`` (float32 scalar) as the scan input.
    ``drop_rate`` is the largest rate of the run (0: nothing is dropped, statically) and ``train``
    an attribute, so the body traces once."""

    train: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array, keep_prob: jax.Array) -> tuple[jax.Array, None]:
        return self._body(inputs, self.train, keep_prob), None


def scanned_blocks(
    block_kwargs: dict, keep_probs: np.ndarray, train: bool, remat: bool, unrolled: bool,
    name: str,
) -> Callable[[jax.Array], jax.Array]:
    """``x -> x`` running ``len(keep_probs)`` identical ``MBConvBlock(**block_kwargs)`` as one
    ``nn.scan`` over stacked variables (leading axis: the repeat), named ``name``; ``unrolled``:
    no loop after tracing (``scan_unroll``)."""
    module = scanned_stack(ScannedMBConvBlock, block_kwargs, len(keep_probs), train, remat, unrolled,
                           name)
    return lambda x: module(x, jnp.asarray(keep_probs, jnp.float32))[0]


class EfficientNet(nn.Module):
    """EfficientNet classifier or feature extractor; see the module docstring for layouts.

    Attributes:
      config: the architecture (``get_efficientnet_config``).
      num_classes: classifier outputs (ignored with ``features_only``).
      features_only: return the stride endpoints instead of logits; head conv and classifier are
        not built.
      dtype: computation dtype (float32, bfloat16, float16); params and BN statistics stay float32.
      cpu_kernels: the CPU-kernel policy its ops are traced with, ``auto`` | ``off`` | ``require``
        (``effdet_jax.ops.policy``); ``None``: the enclosing policy (an EfficientDet's), else the
        process default (``$EFFDET_JAX_CPU_KERNELS`` or ``auto``).
      axis_name: BN cross-device axis, only for ``shard_map``/``pmap`` code.
      remat: rematerialise each block in the backward pass (saves memory).
      unrolled: unroll the scans over each stage's repeated blocks after tracing (no loop; still
        over the stacked variables).
    """

    config: EfficientNetConfig
    num_classes: int = 1000
    features_only: bool = False
    dtype: Dtype = jnp.float32
    cpu_kernels: str | None = None
    axis_name: str | None = None
    remat: bool = False
    unrolled: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        with cpu_kernels(self.cpu_kernels):
            return self._forward(x, train)

    def _forward(self, x: jax.Array, train: bool):
        cfg = self.config
        act = activation_fn(cfg.activation)
        x = x.astype(self.dtype)
        x = Conv2D(
            cfg.round_filters(cfg.stem_filters, skip=cfg.fix_head_stem),
            kernel_size=3, strides=2, dtype=self.dtype, name="stem_conv",
        )(x)
        x = batch_norm(train, "stem_bn", self.dtype, self.axis_name, act)(x)

        blocks = cfg.expanded_blocks()
        block_cls = nn.remat(MBConvBlock, static_argnums=(2,)) if self.remat else MBConvBlock
        endpoints = {}
        stride = 2

        def block_kwargs(i: int, drop_rate: float) -> dict:
            args = blocks[i]
            return dict(
                kernel=args["kernel"],
                stride=args["stride"],
                expand_ratio=args["expand_ratio"],
                filters_in=args["filters_in"],
                filters_out=args["filters_out"],
                se_ratio=args["se_ratio"],
                activation=cfg.activation,
                drop_rate=drop_rate,
                drop_variant=cfg.drop_connect_variant,
                dtype=self.dtype,
                axis_name=self.axis_name,
            )

        for first, last, _ in stage_runs(blocks):
            if blocks[first]["stride"] > 1:
                endpoints[stride] = x
                stride *= blocks[first]["stride"]
            rates = [block_drop_rate(cfg, i) for i in range(first, last + 1)]
            x = block_cls(**block_kwargs(first, rates[0]), name=f"block_{first}")(x, train)
            if last > first:
                keep_probs = np.asarray([1.0 - r for r in rates[1:]], np.float32)
                x = scanned_blocks(
                    block_kwargs(first + 1, max(rates[1:])), keep_probs, train, self.remat,
                    self.unrolled, stacked_block_name(first + 1, last),
                )(x)
        endpoints[stride] = x
        if self.features_only:
            return endpoints

        x = Conv2D(
            cfg.round_filters(cfg.head_filters, skip=cfg.fix_head_stem),
            dtype=self.dtype, name="head_conv",
        )(x)
        x = batch_norm(train, "head_bn", self.dtype, self.axis_name, act)(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(cfg.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(
            self.num_classes,
            kernel_init=dense_kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="classifier",
        )(x)
        return x.astype(jnp.float32)


def efficientnet(name: str, num_classes: int = 1000, **overrides) -> EfficientNet:
    """Build ``efficientnet-b0`` .. ``b7`` or ``efficientnet-lite0`` .. ``lite4``.

    ``overrides`` may set module attributes (``features_only``, ``dtype``, ``cpu_kernels``,
    ``axis_name``, ``remat``) or any ``EfficientNetConfig`` field (e.g. ``drop_connect_rate=0.3``,
    ``drop_connect_variant="channel"``).
    """
    module_fields = {"features_only", "dtype", "cpu_kernels", "axis_name", "remat", "unrolled"}
    module_kwargs = {k: overrides.pop(k) for k in list(overrides) if k in module_fields}
    config = get_efficientnet_config(name, **overrides)
    return EfficientNet(config=config, num_classes=num_classes, **module_kwargs)


def count_params(variables_or_shapes) -> int:
    """Number of entries in the ``params`` collection (what the papers and timm count)."""
    params = variables_or_shapes["params"] if "params" in variables_or_shapes else variables_or_shapes
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
