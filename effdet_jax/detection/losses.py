"""EfficientDet training losses as pure functions (automl ``train_lib``), always in float32.

Layouts: flattened over levels in anchor order (see ``targets.flatten_level_outputs``):
class logits ``[B, A, C]``, box deltas ``[B, A, 4]`` ``(ty, tx, th, tw)``, targets from
``targets.assign_targets`` (``cls_targets [B, A]``, ``box_targets [B, A, 4]``,
``num_positives [B]``). Per-level lists ``[B, H, W, A*K]`` are accepted too.

The normaliser is ``sum(num_positives) + 1`` over the whole (global) batch. Inside a sharded
``jax.jit`` a ``jnp.sum`` over the batch axis is already global under GSPMD, so the loss is the
same on 1 or N devices.

automl quirks, decided:
  1. *Reproduced.* Box (Huber) and IoU losses use ``box_targets != 0`` as the mask **per
     coordinate**: a positive whose target delta is exactly 0 in some coordinate (a gt sharing an
     anchor's center or size) gets no loss for it, and one that equals its anchor gets none at all.
     Keeping it makes the numbers (and the training) automl's.
  2. *Not reproduced.* automl's ``BoxIouLoss`` decodes level-major rows (level, batch, ...) against
     batch-major tiled anchors, so for batch > 1 most rows are decoded against another image's
     anchors. That is a bug (the loss then depends on the batch composition). Here every row is
     decoded against its own anchor, which equals automl's per-image numbers and
     ``losses.json``'s ``box_iou_loss_*_batch_major_rows``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effdet_jax.detection import box_coder
from effdet_jax.detection.targets import IGNORE, flatten_level_outputs

IOU_LOSS_TYPES = ("iou", "giou", "diou", "ciou")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """automl's loss hyper-parameters (``hparams_config``) with their defaults."""

    alpha: float = 0.25
    gamma: float = 1.5
    label_smoothing: float = 0.0
    delta: float = 0.1
    box_loss_weight: float = 50.0
    iou_loss_type: str | None = None
    iou_loss_weight: float = 1.0
    weight_decay: float = 4e-5

    def __post_init__(self) -> None:
        if self.iou_loss_type is not None and self.iou_loss_type not in IOU_LOSS_TYPES:
            raise ValueError(f"iou_loss_type must be one of {IOU_LOSS_TYPES} or None")


def _focal_terms(
    x: jax.Array, y: jax.Array, weight: jax.Array, alpha: float, gamma: float, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """Element-wise focal loss and its derivative in the logits, both float32.

    ``y`` is the 0/1 target, ``weight`` 0 where the element is ignored. With ``s = x`` for
    negatives and ``-x`` for positives, ``log(1 - p_t) = log_sigmoid(s)`` and the cross-entropy
    against the smoothed target is ``softplus(s) - label_smoothing / 2 * s``; both share one
    ``exp(-|s|)`` and one ``log1p``, so every term is finite and accurate for any logit. The
    derivative is written out, so the backward pass reads one stored array instead of
    differentiating through the transcendental chain again.
    """
    sign = 1.0 - 2.0 * y  # ds/dx
    s = sign * x
    e = jnp.exp(-jnp.abs(s))
    log1p_e = jnp.log1p(e)
    log_one_minus_pt = jnp.minimum(s, 0.0) - log1p_e  # log_sigmoid(s)
    sigmoid_s = jnp.where(s >= 0.0, 1.0, e) / (1.0 + e)  # 1 - p_t
    modulating = jnp.exp(gamma * log_one_minus_pt)
    ce = jnp.maximum(s, 0.0) + log1p_e - 0.5 * label_smoothing * s
    w = weight * jnp.where(y > 0.0, alpha, 1.0 - alpha)
    loss = w * modulating * ce
    # d/ds: gamma * (1 - sigmoid(s)) * modulating * ce + modulating * (sigmoid(s) - ls / 2).
    grad = w * modulating * sign * (
        gamma * (1.0 - sigmoid_s) * ce + sigmoid_s - 0.5 * label_smoothing
    )
    return loss, grad


def focal_loss(
    logits: jax.Array,
    targets: jax.Array,
    alpha: float = 0.25,
    gamma: float = 1.5,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Element-wise sigmoid focal loss ``alpha_t (1 - p_t)^gamma BCE(y_smoothed, logits)``.

    ``targets`` are 0/1 (one-hot) of the logits' shape. Everything comes from
    ``log(1 - p_t) = log_sigmoid(s)`` (``s = x`` for negatives, ``-x`` for positives), and the
    modulating factor is ``exp(gamma * log(1 - p_t))``, so the value and its gradient stay finite
    for logits of any float32 magnitude and any ``gamma >= 0`` (``(1-p_t)**gamma`` has an infinite
    slope at 0 for ``gamma < 1``). As in automl, ``alpha_t`` and the modulating factor use the
    hard targets; label smoothing (towards 0.5) only enters the cross-entropy. Not normalised.
    :func:`focal_loss_sum` is the fused form the training loss uses.
    """
    x = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    return _focal_terms(x, y, jnp.ones_like(x), alpha, gamma, label_smoothing)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def focal_loss_sum(
    logits: jax.Array,
    cls_targets: jax.Array,
    alpha: float = 0.25,
    gamma: float = 1.5,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """``sum(focal_loss)`` over ``logits [B, N, C]`` for integer ``cls_targets [B, N]``.

    ``cls_targets`` are 0-based classes, ``-1`` for background and ``IGNORE`` (-2) for anchors
    that get no loss. The loss and its gradient are computed in one pass over the logits (a
    hand-written VJP): on CPU the focal term over ``[B, 49104, 90]`` (D0 at 512) was the largest
    single cost of the training step when differentiated automatically.
    """
    return _focal_sum_fwd(logits, cls_targets, alpha, gamma, label_smoothing)[0]


def _focal_sum_fwd(logits, cls_targets, alpha, gamma, label_smoothing):
    x = logits.astype(jnp.float32)
    y = (cls_targets[..., None] == jnp.arange(x.shape[-1], dtype=cls_targets.dtype)).astype(
        jnp.float32
    )
    weight = (cls_targets != IGNORE)[..., None].astype(jnp.float32)
    loss, grad = _focal_terms(x, y, weight, alpha, gamma, label_smoothing)
    # Summing over classes first lets XLA:CPU fuse the focal terms into that reduction instead of
    # writing the element-wise loss out for one big reduction (timings in benchmarks/RESULTS.md).
    return jnp.sum(jnp.sum(loss, axis=-1)), (grad.astype(logits.dtype), cls_targets)


def _focal_sum_bwd(alpha, gamma, label_smoothing, residuals, g):
    grad, cls_targets = residuals
    return (g.astype(grad.dtype) * grad, np.zeros(cls_targets.shape, jax.dtypes.float0))


focal_loss_sum.defvjp(_focal_sum_fwd, _focal_sum_bwd)


def huber_loss(outputs: jax.Array, targets: jax.Array, delta: float = 0.1) -> jax.Array:
    """Element-wise Huber loss masked where ``targets == 0`` (automl quirk 1, per coordinate).

    ``0.5 e^2`` for ``|e| <= delta``, else ``delta |e| - 0.5 delta^2`` (Keras ``Huber``). Not
    normalised.
    """
    outputs = outputs.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    err = jnp.abs(outputs - targets)
    quadratic = jnp.minimum(err, delta)
    loss = 0.5 * quadratic**2 + delta * (err - quadratic)
    return jnp.where(targets != 0.0, loss, 0.0)


def _divide_no_nan(a: jax.Array, b: jax.Array) -> jax.Array:
    # Gradient-safe: the unused branch never divides by zero.
    safe = jnp.where(b == 0.0, 1.0, b)
    return jnp.where(b == 0.0, 0.0, a / safe)


def box_iou(pred: jax.Array, target: jax.Array, iou_type: str = "iou") -> jax.Array:
    """IoU / GIoU / DIoU / CIoU of paired yxyx boxes ``[..., 4]`` -> ``[...]`` (automl
    ``iou_utils._iou_per_anchor``: sizes clamped at 0, 0/0 = 0, distances per box)."""
    if iou_type not in IOU_LOSS_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_LOSS_TYPES}")
    p_ymin, p_xmin, p_ymax, p_xmax = jnp.moveaxis(pred, -1, 0)
    t_ymin, t_xmin, t_ymax, t_xmax = jnp.moveaxis(target, -1, 0)
    p_w, p_h = jnp.maximum(0.0, p_xmax - p_xmin), jnp.maximum(0.0, p_ymax - p_ymin)
    t_w, t_h = jnp.maximum(0.0, t_xmax - t_xmin), jnp.maximum(0.0, t_ymax - t_ymin)
    inter_w = jnp.maximum(0.0, jnp.minimum(p_xmax, t_xmax) - jnp.maximum(p_xmin, t_xmin))
    inter_h = jnp.maximum(0.0, jnp.minimum(p_ymax, t_ymax) - jnp.maximum(p_ymin, t_ymin))
    inter = inter_w * inter_h
    union = p_w * p_h + t_w * t_h - inter
    iou = _divide_no_nan(inter, union)
    if iou_type == "iou":
        return iou
    enc_h = jnp.maximum(p_ymax, t_ymax) - jnp.minimum(p_ymin, t_ymin)
    enc_w = jnp.maximum(p_xmax, t_xmax) - jnp.minimum(p_xmin, t_xmin)
    if iou_type == "giou":
        enc_area = jnp.maximum(0.0, enc_w) * jnp.maximum(0.0, enc_h)
        return iou - _divide_no_nan(enc_area - union, enc_area)
    center_dist2 = ((t_ymin + t_ymax) / 2 - (p_ymin + p_ymax) / 2) ** 2 + (
        (t_xmin + t_xmax) / 2 - (p_xmin + p_xmax) / 2
    ) ** 2
    diou = iou - _divide_no_nan(center_dist2, enc_h**2 + enc_w**2)
    if iou_type == "diou":
        return diou
    # v = (4/pi^2) (atan(w_t/h_t) - atan(w_p/h_p))^2, with alpha = v / (1 - iou + v).
    arctan = jnp.arctan(_divide_no_nan(t_w, t_h)) - jnp.arctan(_divide_no_nan(p_w, p_h))
    v = 4.0 * (arctan / jnp.pi) ** 2
    # The CIoU paper (and automl's custom gradient) treat alpha as a constant weight.
    alpha = jax.lax.stop_gradient(_divide_no_nan(v, (1.0 - iou) + v))
    return diou - alpha * v


def box_iou_loss(
    box_outputs: jax.Array, box_targets: jax.Array, anchors: jax.Array, iou_type: str
) -> jax.Array:
    """Element-wise ``1 - {IoU, GIoU, DIoU, CIoU}`` per anchor, ``[B, A]``, not normalised.

    Both delta sets are decoded against their own anchor (batch-major, quirk 2 fixed) and the
    decoded coordinates are multiplied by ``box_targets != 0`` (quirk 1, reproduced: coordinate
    ``k`` of the box by the mask of delta ``k``). Rows whose masked target box is empty get 0.
    """
    mask = (box_targets != 0.0).astype(jnp.float32)
    pred = box_coder.decode(box_outputs.astype(jnp.float32), anchors) * mask
    target = box_coder.decode(box_targets.astype(jnp.float32), anchors) * mask
    valid = (target[..., 2] > target[..., 0]) & (target[..., 3] > target[..., 1])
    valid_f = valid.astype(jnp.float32)[..., None]
    return jnp.where(valid, 1.0 - box_iou(pred * valid_f, target * valid_f, iou_type), 0.0)


def _leaf_name(path: tuple[Any, ...]) -> str:
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


_KERNEL = re.compile(r".*kernel$")


def l2_regularization(params: Any, weight_decay: float = 4e-5) -> jax.Array:
    """``weight_decay * sum(0.5 * ||w||^2)`` over leaves whose name ends in ``kernel``.

    Like automl's ``_reg_l2_loss`` (regex ``.*(kernel|weight):0$``, ``tf.nn.l2_loss``): conv,
    depthwise and pointwise kernels count; biases, BN scale/offset/statistics and BiFPN fusion
    weights do not.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    terms = [
        0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        for path, leaf in leaves
        if _KERNEL.match(_leaf_name(path))
    ]
    if not terms:
        return jnp.zeros((), jnp.float32)
    return weight_decay * sum(terms)


def _num_classes(cls_outputs: jax.Array | Sequence[jax.Array], num_rows: int) -> int:
    if not isinstance(cls_outputs, list | tuple):
        return cls_outputs.shape[-1]
    # Per level: channels = A*C and rows = H*W*A, so C = channels * sum(H*W) / rows.
    cells = sum(x.shape[1] * x.shape[2] for x in cls_outputs)
    return cls_outputs[0].shape[-1] * cells // num_rows


def _flat(outputs: jax.Array | Sequence[jax.Array], k: int) -> jax.Array:
    if isinstance(outputs, list | tuple):
        return flatten_level_outputs(outputs, k)
    return outputs


def _elementwise(
    cls_outputs: jax.Array | Sequence[jax.Array],
    box_outputs: jax.Array | Sequence[jax.Array],
    targets: Mapping[str, jax.Array],
    config: LossConfig,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Un-normalised focal ``[B, A, C]`` and Huber ``[B, A, 4]`` terms, the float32 deltas and the
    normaliser ``sum(num_positives) + 1``."""
    cls_targets = targets["cls_targets"]
    num_classes = _num_classes(cls_outputs, cls_targets.shape[1])
    logits = _flat(cls_outputs, num_classes).astype(jnp.float32)
    deltas = _flat(box_outputs, 4).astype(jnp.float32)
    normalizer = jnp.sum(targets["num_positives"].astype(jnp.float32)) + 1.0
    one_hot = jax.nn.one_hot(cls_targets, num_classes, dtype=jnp.float32)  # -1/-2 -> zeros
    cls_elem = focal_loss(logits, one_hot, config.alpha, config.gamma, config.label_smoothing)
    cls_elem = jnp.where((cls_targets != IGNORE)[..., None], cls_elem, 0.0)
    box_elem = huber_loss(deltas, targets["box_targets"], config.delta)
    return cls_elem, box_elem, deltas, normalizer


def _class_loss_sum(
    cls_outputs: jax.Array | Sequence[jax.Array], cls_targets: jax.Array, config: LossConfig
) -> jax.Array:
    """Un-normalised focal loss, level by level: the per-level logits are only reshaped, never
    concatenated into one ``[B, A, C]`` copy (nor sliced apart again in the backward pass)."""
    num_classes = _num_classes(cls_outputs, cls_targets.shape[1])
    levels = cls_outputs if isinstance(cls_outputs, list | tuple) else [cls_outputs]
    total, start = jnp.zeros((), jnp.float32), 0
    for level in levels:
        logits = jnp.reshape(level, (cls_targets.shape[0], -1, num_classes))
        rows = logits.shape[1]
        total += focal_loss_sum(
            logits, cls_targets[:, start : start + rows], config.alpha, config.gamma,
            config.label_smoothing,
        )
        start += rows
    return total


def per_level_losses(
    cls_outputs: jax.Array | Sequence[jax.Array],
    box_outputs: jax.Array | Sequence[jax.Array],
    targets: Mapping[str, jax.Array],
    anchors_per_level: Mapping[int, int],
    config: LossConfig = LossConfig(),
) -> dict[str, jax.Array]:
    """``cls_loss_L`` and ``box_loss_L`` for each level ``L`` (they sum to ``cls_loss`` and
    ``box_loss``); ``anchors_per_level`` is ``anchors.num_anchors_per_level(cfg)``."""
    cls_elem, box_elem, _, normalizer = _elementwise(cls_outputs, box_outputs, targets, config)
    out, start = {}, 0
    for level, n in anchors_per_level.items():
        out[f"cls_loss_{level}"] = jnp.sum(cls_elem[:, start : start + n]) / normalizer
        out[f"box_loss_{level}"] = jnp.sum(box_elem[:, start : start + n]) / (4.0 * normalizer)
        start += n
    return out


def detection_loss(
    cls_outputs: jax.Array | Sequence[jax.Array],
    box_outputs: jax.Array | Sequence[jax.Array],
    targets: Mapping[str, jax.Array],
    anchors: jax.Array,
    config: LossConfig = LossConfig(),
    params: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total EfficientDet loss and its parts (all float32 scalars).

    Args:
      cls_outputs: logits ``[B, A, C]`` (or per-level ``[B, H, W, A*C]``), any float dtype.
      box_outputs: deltas ``[B, A, 4]`` (or per-level ``[B, H, W, A*4]``).
      targets: ``cls_targets [B, A]``, ``box_targets [B, A, 4]``, ``num_positives [B]``.
      anchors: ``[A, 4]`` yxyx pixels (only used by the IoU loss).
      config: :class:`LossConfig`.
      params: if given, ``l2_regularization(params, config.weight_decay)`` is added.
    Returns:
      ``(total, parts)``; ``total = cls + box_loss_weight * box + iou_loss_weight * iou (+ l2)``,
      ``parts`` has ``cls_loss``, ``box_loss``, ``box_iou_loss``, ``det_loss`` (without L2),
      ``reg_l2_loss`` (0 without ``params``) and ``num_positives_sum`` (the normaliser).
    """
    cls_targets = targets["cls_targets"]
    deltas = _flat(box_outputs, 4).astype(jnp.float32)
    normalizer = jnp.sum(targets["num_positives"].astype(jnp.float32)) + 1.0
    cls_loss = _class_loss_sum(cls_outputs, cls_targets, config) / normalizer
    box_elem = huber_loss(deltas, targets["box_targets"], config.delta)
    box_loss = jnp.sum(box_elem) / (4.0 * normalizer)
    if config.iou_loss_type:
        iou_elem = box_iou_loss(deltas, targets["box_targets"], anchors, config.iou_loss_type)
        iou_loss = jnp.sum(iou_elem) / (4.0 * normalizer)
    else:
        iou_loss = jnp.zeros((), jnp.float32)
    det_loss = cls_loss + config.box_loss_weight * box_loss + config.iou_loss_weight * iou_loss
    reg = (
        l2_regularization(params, config.weight_decay)
        if params is not None
        else jnp.zeros((), jnp.float32)
    )
    parts = {
        "cls_loss": cls_loss,
        "box_loss": box_loss,
        "box_iou_loss": iou_loss,
        "det_loss": det_loss,
        "reg_l2_loss": reg,
        "num_positives_sum": normalizer,
    }
    return det_loss + reg, parts
