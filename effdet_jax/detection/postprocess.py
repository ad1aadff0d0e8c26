"""Detection post-processing on device: candidates -> decode -> NMS -> fixed-size detections.

Everything is batched, jit-able and shaped statically: the outputs are always
``boxes [B, D, 4]`` (yxyx, original-image pixels), ``scores [B, D]``, ``classes [B, D]`` (0-based
int32) and ``valid [B]`` (number of real rows; rows past it are zero boxes, score 0, class -1),
with ``D = max_detections`` (100).

Pipeline (automl ``tf2/postprocess.py``):
  1. candidates: ``"max_class"`` (automl's default, ``max_nms_inputs=0``) keeps each anchor's
     best class; ``"top_pairs"`` (automl's ``max_nms_inputs>0`` and effdet) keeps the best
     (anchor, class) pairs. Either way at most ``pre_nms_top_k`` candidates by logit survive (0 =
     all; automl's default keeps all anchors; 5000 gives the same detections on D0, tested, and
     is 5-7x faster). The logits stay per level (concatenating ``[B, A, C]`` is the most
     expensive step on CPU): per-anchor maxima pick the top anchors, and only their rows are
     gathered (the top (anchor, class) pairs always lie in the top anchors by best logit);
  2. decode the candidates' deltas against their anchors; score = sigmoid(logit);
  3. greedy NMS over the candidates, ``global`` (class-agnostic, automl ``postprocess_global``) or
     ``per_class`` (``postprocess_per_class``: boxes only suppress boxes of their own class);
  4. clip to the input image (automl does this in the global path only; ``clip_boxes=None``
     follows it) and multiply by ``image_scale``.

NMS is the eager form of TF's ``NonMaxSuppressionV5`` (which automl calls): ``max_detections``
steps, each picking the highest current score, recording it, and updating every other candidate
from its IoU with the pick (IoU as TF computes it: corners sorted, 0 if either area is 0):
  * ``hard``: drop candidates with IoU > ``iou_threshold`` (score threshold -inf by default);
  * ``soft_gaussian``: multiply scores by ``exp(-iou^2 / sigma)`` (the paper's sigma, 0.5;
    automl hands TF ``sigma/2`` because TF's op uses ``exp(-0.5 iou^2 / sigma_tf)``, so the
    weights are the same), dropping candidates whose score falls to ``<= score_threshold``
    (0.001 by default, automl's ``score_thresh or 0.001``). Picked scores are the decayed ones;
  * ``soft_linear``: multiply by ``1 - iou`` where IoU > ``iou_threshold`` (the Soft-NMS paper's
    linear rule; automl's TF path does not offer it).
Per class, one greedy pass with class-masked IoU gives exactly the per-class NMS results merged by
score, which is what automl's per-class path returns after its top-k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from effdet_jax.detection import box_coder
from effdet_jax.detection.targets import flatten_level_outputs

NMS_METHODS = ("hard", "soft_gaussian", "soft_linear")
CANDIDATE_MODES = ("max_class", "top_pairs")


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing settings; defaults are automl's inference defaults (global soft-NMS).

    Attributes:
      method: ``hard``, ``soft_gaussian`` or ``soft_linear``.
      per_class: NMS within each class (automl ``postprocess_per_class``) instead of globally.
      iou_threshold: hard / linear suppression threshold.
      sigma: Gaussian soft-NMS sigma, paper convention (``exp(-iou^2/sigma)``).
      score_threshold: candidates at or below it are dropped; ``None`` means automl's default
        (-inf for hard, 0.001 for soft).
      max_detections: fixed number of output rows per image.
      pre_nms_top_k: candidates kept before NMS (0 = all).
      candidates: ``max_class`` (one class per anchor) or ``top_pairs`` ((anchor, class) pairs).
      clip_boxes: clip to the input image before scaling; ``None`` = automl (global path only).
    """

    method: str = "soft_gaussian"
    per_class: bool = False
    iou_threshold: float = 0.5
    sigma: float = 0.5
    score_threshold: float | None = None
    max_detections: int = 100
    pre_nms_top_k: int = 5000
    candidates: str = "max_class"
    clip_boxes: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in NMS_METHODS:
            raise ValueError(f"method must be one of {NMS_METHODS}, got {self.method!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise ValueError(f"candidates must be one of {CANDIDATE_MODES}, got {self.candidates!r}")

    @property
    def effective_score_threshold(self) -> float:
        if self.score_threshold is not None:
            return float(self.score_threshold)
        return float("-inf") if self.method == "hard" else 0.001

    @property
    def effective_clip(self) -> bool:
        return (not self.per_class) if self.clip_boxes is None else self.clip_boxes


def _gather_rows(levels: Sequence[jax.Array], rows: jax.Array) -> jax.Array:
    """Rows ``[K, C]`` of the virtual concatenation of ``levels`` (each ``[N_l, C]``), without
    materialising it (on CPU that copy costs more than the rest of post-processing)."""
    out, start = None, 0
    for level in levels:
        n = level.shape[0]
        inside = (rows >= start) & (rows < start + n)
        got = level[jnp.clip(rows - start, 0, n - 1)]
        out = got if out is None else jnp.where(inside[:, None], got, out)
        start += n
    return out


def _first_argmax(x: jax.Array, row_max: jax.Array) -> jax.Array:
    # argmax as a min-reduce over the positions of the max: XLA:CPU's variadic argmax reduce is
    # an order of magnitude slower. Same result (first index on ties).
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == row_max[..., None], iota, x.shape[-1]), axis=-1)


def _select_candidates(
    levels: Sequence[jax.Array], top_k: int, mode: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-level logits ``[N_l, C]`` (rows in anchor order) -> candidates
    ``(anchor_idx [K], class [K], logit [K])``, best first (exact ties: lower anchor first)."""
    num_classes = levels[0].shape[-1]
    total = sum(x.shape[0] for x in levels)
    k = total if top_k <= 0 else min(top_k, total)
    # Each anchor's best logit; the anchors holding the top-k pairs are among the top-k anchors by
    # it (an anchor with a top-k pair has its best logit >= that pair's), so both modes start here.
    best = jnp.concatenate([jnp.max(x, axis=-1) for x in levels])
    top_logits, anchor_idx = lax.top_k(best, k)
    rows = _gather_rows(levels, anchor_idx)  # [k, C]
    if mode == "max_class":
        return anchor_idx, _first_argmax(rows, top_logits), top_logits
    k_pairs = total * num_classes if top_k <= 0 else min(top_k, total * num_classes)
    pair_logits, pos = lax.top_k(jnp.reshape(rows, (-1,)), k_pairs)
    return anchor_idx[pos // num_classes], (pos % num_classes).astype(jnp.int32), pair_logits


def _iou_one_to_many(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU of ``box [4]`` with ``boxes [K, 4]`` the way TF's NMS kernel computes it."""
    def corners(b: jax.Array) -> tuple[jax.Array, ...]:
        y1, x1, y2, x2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
        return jnp.minimum(y1, y2), jnp.minimum(x1, x2), jnp.maximum(y1, y2), jnp.maximum(x1, x2)

    ay1, ax1, ay2, ax2 = corners(box)
    by1, bx1, by2, bx2 = corners(boxes)
    area_a = (ay2 - ay1) * (ax2 - ax1)
    area_b = (by2 - by1) * (bx2 - bx1)
    ih = jnp.maximum(jnp.minimum(ay2, by2) - jnp.maximum(ay1, by1), 0.0)
    iw = jnp.maximum(jnp.minimum(ax2, bx2) - jnp.maximum(ax1, bx1), 0.0)
    inter = ih * iw
    union = area_a + area_b - inter
    ok = (area_a > 0) & (area_b > 0)
    return jnp.where(ok, inter / jnp.where(ok, union, 1.0), 0.0)


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    config: PostprocessConfig = PostprocessConfig(),
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy (soft-)NMS of one image's candidates.

    Args:
      boxes: ``[K, 4]`` yxyx; scores: ``[K]`` (probabilities); classes: ``[K]`` int.
    Returns:
      ``(index [D] int32 into K, score [D], valid [D] bool)`` in pick order (non-increasing
      score); ``D = config.max_detections``.
    """
    threshold = config.effective_score_threshold
    alive = jnp.where(scores > threshold, scores, -jnp.inf)
    num = config.max_detections
    candidate_ids = jnp.arange(scores.shape[0])
    step_ids = jnp.arange(num)

    def step(i: int, state: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        current, picked, picked_scores, picked_valid = state
        j = jnp.argmax(current)
        # One-hot reads of row j (exact: one term is not zero): batched dynamic indexing inside
        # a loop is what ONNX converters mishandle.
        hit = candidate_ids == j
        score = jnp.max(current)
        valid = score > -jnp.inf
        iou = _iou_one_to_many(jnp.sum(jnp.where(hit[:, None], boxes, 0.0), axis=0), boxes)
        if config.per_class:
            iou = jnp.where(classes == jnp.sum(jnp.where(hit, classes, 0)), iou, 0.0)
        if config.method == "hard":
            updated = jnp.where(iou > config.iou_threshold, -jnp.inf, current)
        else:
            if config.method == "soft_gaussian":
                weight = jnp.exp(-(iou * iou) / config.sigma)
            else:
                weight = jnp.where(iou > config.iou_threshold, 1.0 - iou, 1.0)
            decayed = current * weight
            updated = jnp.where(decayed > threshold, decayed, -jnp.inf)
        # Masked selects rather than ``.at[].set``: the same values, without the batched
        # scatter that vmap makes of them, which ONNX converters cannot lower.
        updated = jnp.where(hit, -jnp.inf, updated)
        # Once nothing is left, later steps must not change anything.
        current = jnp.where(valid, updated, current)
        row = step_ids == i
        picked = jnp.where(row, jnp.where(valid, j, 0).astype(jnp.int32), picked)
        picked_scores = jnp.where(row, jnp.where(valid, score, 0.0), picked_scores)
        picked_valid = jnp.where(row, valid.astype(jnp.int32), picked_valid)  # int: ONNX Where
        return current, picked, picked_scores, picked_valid

    init = (
        alive,
        jnp.zeros((num,), jnp.int32),
        jnp.zeros((num,), scores.dtype),
        jnp.zeros((num,), jnp.int32),
    )
    _, picked, picked_scores, picked_valid = lax.fori_loop(0, num, step, init)
    return picked, picked_scores, picked_valid > 0


def _postprocess_one(
    logits: Sequence[jax.Array],
    deltas: jax.Array,
    anchors: jax.Array,
    image_hw: tuple[int, int],
    scale: jax.Array,
    config: PostprocessConfig,
) -> dict[str, jax.Array]:
    anchor_idx, classes, top_logits = _select_candidates(
        logits, config.pre_nms_top_k, config.candidates
    )
    boxes = box_coder.decode(deltas[anchor_idx], anchors[anchor_idx])
    scores = jax.nn.sigmoid(top_logits)
    picked, picked_scores, valid = nms(boxes, scores, classes, config)
    out_boxes = boxes[picked]
    if config.effective_clip:
        h, w = image_hw
        out_boxes = jnp.clip(out_boxes, 0.0, jnp.array([h, w, h, w], out_boxes.dtype))
    out_boxes = jnp.where(valid[:, None], out_boxes * scale, 0.0)
    return {
        "boxes": out_boxes,
        "scores": picked_scores,
        "classes": jnp.where(valid, classes[picked], -1).astype(jnp.int32),
        "valid": jnp.sum(valid).astype(jnp.int32),
    }


def postprocess(
    cls_outputs: jax.Array | Sequence[jax.Array],
    box_outputs: jax.Array | Sequence[jax.Array],
    anchors: jax.Array,
    image_size: int | tuple[int, int],
    image_scale: jax.Array | None = None,
    config: PostprocessConfig = PostprocessConfig(),
) -> dict[str, jax.Array]:
    """Batched detections from raw network outputs (jit with ``image_size``/``config`` static).

    Args:
      cls_outputs: logits ``[B, A, C]`` or per level ``[B, H, W, A*C]`` (any float dtype).
      box_outputs: deltas ``[B, A, 4]`` or per level ``[B, H, W, A*4]``.
      anchors: ``[A, 4]`` yxyx input pixels (``anchors.generate_anchors``).
      image_size: the network input size, ``int`` or ``(height, width)`` (for clipping).
      image_scale: ``[B]`` original-image pixels per input pixel (boxes are multiplied by it);
        ``None`` = 1.
      config: :class:`PostprocessConfig`.
    Returns:
      ``boxes [B, D, 4]`` float32 yxyx, ``scores [B, D]``, ``classes [B, D]`` int32 0-based
      (-1 on padding rows), ``valid [B]`` int32.
    """
    if isinstance(box_outputs, list | tuple):
        box_outputs = flatten_level_outputs(box_outputs, 4)
    batch, rows = box_outputs.shape[:2]
    if isinstance(cls_outputs, list | tuple):
        cells = sum(x.shape[1] * x.shape[2] for x in cls_outputs)
        num_classes = cls_outputs[0].shape[-1] * cells // rows
        # Kept per level: concatenating [B, A, C] logits would be the slowest step on CPU.
        logits = [jnp.reshape(x, (batch, -1, num_classes)) for x in cls_outputs]
    else:
        logits = [cls_outputs]
    logits = [x.astype(jnp.float32) for x in logits]
    deltas = box_outputs.astype(jnp.float32)
    scale = (
        jnp.ones((batch,), jnp.float32)
        if image_scale is None
        else jnp.asarray(image_scale, jnp.float32).reshape(batch)
    )
    image_hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    anchors = jnp.asarray(anchors, jnp.float32)
    fn = lambda lg, dl, sc: _postprocess_one(lg, dl, anchors, image_hw, sc, config)
    return jax.vmap(fn)(logits, deltas, scale)
