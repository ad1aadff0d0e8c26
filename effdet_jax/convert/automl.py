"""google/automl EfficientDet checkpoints -> effdet_jax variables.

Reads the released TF1-style checkpoints (``efficientdet-d0/model``, names like
``efficientnet-b0/blocks_3/conv2d/kernel``, with ``.../ExponentialMovingAverage`` copies that are
preferred when present) and TF2 Keras checkpoints (``model.save_weights``: object-graph keys like
``backbone/_blocks/3/_expand_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE``), through
``tf.train.load_checkpoint`` (TensorFlow is only needed for reading checkpoint files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from effdet_jax.convert.common import fill_variables
from effdet_jax.models.bifpn import bifpn_nodes
from effdet_jax.models.efficientdet import EfficientDet, efficientdet
from effdet_jax.models.layout import model_groups, to_stacked, to_unrolled

EMA_SUFFIX = "/ExponentialMovingAverage"
TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_BN_TF = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def _depthwise(x: np.ndarray) -> np.ndarray:
    """TF depthwise kernel ``[kh, kw, C, 1]`` -> ours ``[kh, kw, 1, C]``."""
    return np.ascontiguousarray(np.transpose(x, (0, 1, 3, 2)))


def automl_name_table(model: EfficientDet) -> dict[tuple[str, ...], tuple[str, str, str]]:
    """Target path (unrolled layout, ``effdet_jax.models.layout``) -> (TF1 name, TF2 key without
    suffix, layout) for every variable ``model`` may have (optional resample convs included;
    callers keep the ones the model has).

    layout is ``plain``, ``depthwise`` (transpose) or ``stack:<i>`` (one fusion weight of a node).
    """
    cfg = model.config
    table: dict[tuple[str, ...], tuple[str, str, str]] = {}

    def add(path, tf1, tf2, layout="plain"):
        table[tuple(path)] = (tf1, tf2, layout)

    def bn(path, tf1, tf2):
        for ours, theirs in _BN_TF.items():
            coll = "batch_stats" if ours in ("mean", "var") else "params"
            add((coll, *path, ours), f"{tf1}/{theirs}", f"{tf2}/{theirs}")

    def sep(path, tf1, tf2, tf1_names=("depthwise_kernel", "pointwise_kernel", "bias")):
        add(("params", *path, "depthwise", "kernel"), f"{tf1}/{tf1_names[0]}",
            f"{tf2}/depthwise_kernel", "depthwise")
        add(("params", *path, "pointwise", "kernel"), f"{tf1}/{tf1_names[1]}",
            f"{tf2}/pointwise_kernel")
        add(("params", *path, "bias"), f"{tf1}/{tf1_names[2]}", f"{tf2}/bias")

    # Backbone: TF1 names are positional (conv2d, conv2d_1, tpu_batch_normalization_k), TF2 by role.
    bb = cfg.backbone_name
    add(("params", "backbone", "stem_conv", "kernel"), f"{bb}/stem/conv2d/kernel",
        "backbone/_stem/_conv_stem/kernel")
    bn(("backbone", "stem_bn"), f"{bb}/stem/tpu_batch_normalization", "backbone/_stem/_bn")
    backbone_cfg = cfg.backbone_config()
    for i, blk in enumerate(backbone_cfg.expanded_blocks()):
        t1, t2, ours = f"{bb}/blocks_{i}", f"backbone/_blocks/{i}", ("backbone", f"block_{i}")
        if blk["expand_ratio"] != 1:
            add(("params", *ours, "expand_conv", "kernel"), f"{t1}/conv2d/kernel",
                f"{t2}/_expand_conv/kernel")
            bn((*ours, "expand_bn"), f"{t1}/tpu_batch_normalization", f"{t2}/_bn0")
            k, proj = 1, "conv2d_1"
        else:
            k, proj = 0, "conv2d"
        add(("params", *ours, "depthwise_conv", "kernel"), f"{t1}/depthwise_conv2d/depthwise_kernel",
            f"{t2}/_depthwise_conv/depthwise_kernel", "depthwise")
        suffix = lambda j: "" if j == 0 else f"_{j}"  # noqa: E731
        bn((*ours, "depthwise_bn"), f"{t1}/tpu_batch_normalization{suffix(k)}", f"{t2}/_bn1")
        if blk["se_ratio"]:
            for mine, tf1, tf2 in (("se_reduce", "conv2d", "_se_reduce"),
                                   ("se_expand", "conv2d_1", "_se_expand")):
                for p in ("kernel", "bias"):
                    add(("params", *ours, "se", mine, p), f"{t1}/se/{tf1}/{p}", f"{t2}/_se/{tf2}/{p}")
        add(("params", *ours, "project_conv", "kernel"), f"{t1}/{proj}/kernel",
            f"{t2}/_project_conv/kernel")
        bn((*ours, "project_bn"), f"{t1}/tpu_batch_normalization{suffix(k + 1)}", f"{t2}/_bn2")

    def resample(path, tf1, tf2):
        add(("params", *path, "conv", "kernel"), f"{tf1}/conv2d/kernel", f"{tf2}/conv2d/kernel")
        add(("params", *path, "conv", "bias"), f"{tf1}/conv2d/bias", f"{tf2}/conv2d/bias")
        bn((*path, "bn"), f"{tf1}/bn", f"{tf2}/bn")

    for lvl in range(6, cfg.max_level + 1):
        resample((f"resample_p{lvl}",), f"resample_p{lvl}", f"resample_layers/{lvl - 6}")

    num_levels = cfg.num_levels
    for c in range(cfg.fpn_cell_repeats):
        for k, (_, inputs) in enumerate(bifpn_nodes(cfg.min_level, cfg.max_level)):
            node_id = num_levels + k
            t1 = f"fpn_cells/cell_{c}/fnode{k}"
            t2 = f"fpn_cells/cells/{c}/fnodes/{k}"
            cell = (f"fpn_cell_{c}",)
            for i, src in enumerate(inputs):
                resample((*cell, f"node_{k}_resample_{i}_{src}"),
                         f"{t1}/resample_{i}_{src}_{node_id}", f"{t2}/resample_layers/{i}")
                wsm = "WSM" if i == 0 else f"WSM_{i}"
                add(("params", *cell, f"node_{k}_fusion", str(i)), f"{t1}/{wsm}", f"{t2}/{wsm}",
                    f"stack:{i}")
            op1, op2 = f"{t1}/op_after_combine{node_id}", f"{t2}/op_after_combine"
            if cfg.separable_conv:
                sep((*cell, f"node_{k}_conv"), f"{op1}/conv", f"{op2}/conv_op")
            else:
                for p in ("kernel", "bias"):
                    add(("params", *cell, f"node_{k}_conv", p), f"{op1}/conv/{p}",
                        f"{op2}/conv_op/{p}")
            bn((*cell, f"node_{k}_bn"), f"{op1}/bn", f"{op2}/bn")

    for net, tf_prefix, predict2 in (("class_net", "class", "classes"), ("box_net", "box", "boxes")):
        for r in range(cfg.box_class_repeats):
            sep((net, f"conv_{r}"), f"{net}/{tf_prefix}-{r}", f"{net}/conv_ops/{r}")
            for lvl in range(cfg.min_level, cfg.max_level + 1):
                bn((net, f"bn_{r}_p{lvl}"), f"{net}/{tf_prefix}-{r}-bn-{lvl}",
                   f"{net}/bns/{r}/{lvl - cfg.min_level}")
        sep((net, "predict"), f"{net}/{tf_prefix}-predict", f"{net}/{predict2}")
    return table


def convert_automl_arrays(
    arrays: Mapping[str, np.ndarray], model: EfficientDet, style: str = "tf1",
    ignored: set[str] = frozenset(),
) -> dict:
    """Map automl-named arrays (TF1 names, or TF2 keys without the attribute suffix) onto ``model``.

    Fusion weights (``WSM``, ``WSM_1``, ...) are stacked into one ``[inputs]`` (or
    ``[inputs, channels]``) array per node. Fails listing unmapped and missing names. Returns the
    model's (stacked) layout.
    """
    col = 0 if style == "tf1" else 1
    groups = model_groups(model.config)
    shapes = to_unrolled(jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, *model.config.image_size, 3)), train=False
        )
    ), groups)
    present = set(traverse_util.flatten_dict(dict(shapes)))
    assignments: dict = {}
    stacks: dict[tuple[str, ...], dict[int, tuple[str, np.ndarray | None]]] = {}
    for path, names in automl_name_table(model).items():
        name, layout = names[col], names[2]
        if (path[:-1] if layout.startswith("stack:") else path) not in present:
            continue  # optional layers (1x1 resample convs) the model does not have
        value = arrays.get(name)
        if value is not None and layout == "depthwise":
            value = _depthwise(value)
        if layout.startswith("stack:"):
            stacks.setdefault(path[:-1], {})[int(layout[6:])] = (name, value)
            continue
        assignments[path] = (name, value)
    consumed: set[str] = set()
    for path, parts in stacks.items():
        names = [parts[i][0] for i in range(len(parts))]
        values = [parts[i][1] for i in range(len(parts))]
        if any(v is None for v in values):
            absent = [n for n, v in zip(names, values, strict=True) if v is None]
            assignments[path] = (", ".join(absent), None)
            continue
        assignments[path] = (names[0], np.stack([np.asarray(v, np.float32) for v in values]))
        consumed.update(names[1:])  # the other WSM names went into the same stacked array
    return to_stacked(
        fill_variables(shapes, assignments, arrays.keys(), set(ignored) | consumed), groups
    )


def tf1_arrays(names, get, use_ema: bool = True) -> tuple[dict[str, np.ndarray], set[str]]:
    """TF1-named arrays from ``names`` (``get(name)`` reads one): each variable once, from its
    ``/ExponentialMovingAverage`` copy where present and ``use_ema``, else from the raw copy.
    Returns (arrays, names with no model counterpart on purpose: step counters, momentum slots)."""
    names = list(names)
    present = set(names)
    arrays = {}
    for n in names:
        if n.endswith(EMA_SUFFIX):
            continue
        ema = n + EMA_SUFFIX
        arrays[n] = get(ema if use_ema and ema in present else n)
    ignored = {n for n in arrays if n in ("global_step",) or "Momentum" in n}
    return arrays, ignored


def read_automl_checkpoint(
    path: str, use_ema: bool = True
) -> tuple[dict[str, np.ndarray], str, set[str]]:
    """Read a checkpoint (directory or prefix) into (arrays, style, ignored names).

    TF1: EMA copies replace the raw values when present and ``use_ema`` (the released checkpoints
    keep both). TF2: keys lose their ``/.ATTRIBUTES/VARIABLE_VALUE`` suffix; optimizer slots are
    ignored.
    """
    import tensorflow as tf  # only for reading the checkpoint format

    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no TF checkpoint ('checkpoint' index file) in {path}")
        path = latest
    reader = tf.train.load_checkpoint(path)
    names = list(reader.get_variable_to_shape_map())
    if "_CHECKPOINTABLE_OBJECT_GRAPH" in names:
        arrays = {}
        for n in names:
            if n.endswith(TF2_SUFFIX) and "OPTIMIZER_SLOT" not in n and not n.startswith("optimizer"):
                arrays[n[: -len(TF2_SUFFIX)]] = reader.get_tensor(n)
        return arrays, "tf2", set()
    arrays, ignored = tf1_arrays(names, reader.get_tensor, use_ema)
    return arrays, "tf1", ignored


def load_automl_checkpoint(path: str, name: str, num_classes: int = 90, **overrides) -> dict:
    """Load an automl EfficientDet checkpoint (TF1 released format or TF2 Keras ``save_weights``).

    Args:
      path: checkpoint directory (with a ``checkpoint`` file) or prefix.
      name: model name, e.g. ``efficientdet-d0`` (``overrides`` as for ``efficientdet``).
    Returns:
      ``{"params": ..., "batch_stats": ...}`` for ``effdet_jax.efficientdet(name, num_classes,
      **overrides)``.
    """
    arrays, style, ignored = read_automl_checkpoint(path)
    model = efficientdet(name, num_classes=num_classes, **overrides)
    return convert_automl_arrays(arrays, model, style, ignored)
