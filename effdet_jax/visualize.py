"""Drawing detections on images and the ``predict`` mode's image loop.

Boxes are yxyx in original-image pixels unless a docstring says otherwise; classes are 0-based
label indices into ``class_names``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from effdet_jax.data.image_io import UnreadableImageError, read_rgb

if TYPE_CHECKING:  # transforms imports TensorFlow, which drawing alone does not need
    from effdet_jax.data.transforms import Normalization

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.4  # as automl's inspector (--min_score_thresh)
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)  # fmt: skip

DetectFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _name(label: int, class_names: Sequence[str]) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class_{label}"


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    line_width: int = 2,
) -> Image.Image:
    """Draw the detections scoring at least ``score_threshold`` on a copy of ``image``.

    Args:
      image: [H,W,3] uint8 RGB.
      boxes: [K,4] yxyx original pixels; scores: [K]; classes: [K] 0-based labels.

    Returns:
      A PIL RGB image with a rectangle and a ``"name: score"`` label per kept detection.
    """
    canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for box, score, label in zip(np.asarray(boxes), np.asarray(scores), np.asarray(classes),
                                 strict=True):
        if score < score_threshold:
            continue
        y0, x0, y1, x1 = (float(v) for v in box)
        colour = _PALETTE[int(label) % len(_PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_width)
        text = f"{_name(int(label), class_names)}: {score:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), text, font=font)
        ty = max(0.0, y0 - (ty1 - ty0) - 2)  # above the box, or inside it at the top edge
        draw.rectangle([x0, ty, x0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 2], fill=colour)
        draw.text((x0 + 2, ty), text, fill=(0, 0, 0), font=font)
    return canvas


def preprocess_for_eval(
    image: np.ndarray, image_size: int, normalization: Normalization
) -> tuple[np.ndarray, float]:
    """The eval transform of the input pipeline on one uint8 image, normalised with the model's
    ``(mean_rgb, stddev_rgb)``.

    Returns:
      (network input [S,S,3] float32, image_scale: original pixels per network pixel).
    """
    import tensorflow as tf

    from effdet_jax.data.transforms import normalize_image, resize_crop_pad

    out, _, scale = resize_crop_pad(normalize_image(tf.constant(image), normalization),
                                    tf.zeros([0, 4]), image_size)
    return out.numpy(), float(scale.numpy())


def predict_images(
    paths: Sequence[str],
    detect_fn: DetectFn,
    image_size: int,
    class_names: Sequence[str],
    output_dir: str,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    batch_size: int = 1,
    *,
    normalization: Normalization,
) -> list[dict]:
    """Detect, draw and save: ``<output_dir>/<name>.png`` per image and ``detections.json``.

    Args:
      paths: image files (any PIL-readable format / colour mode).
      detect_fn: [B,S,S,3] float32 normalised images -> (boxes [B,K,4] yxyx network-input
        pixels, scores [B,K], classes [B,K] 0-based, valid [B]). B is always ``batch_size``
        (the last batch is padded with zeros), so a jitted function compiles once.
      image_size: network input size S.
      class_names: name per label index.
      output_dir: created if missing.
      score_threshold: drawing threshold (the json keeps every valid detection).
      normalization: the model's ``(mean_rgb, stddev_rgb)`` (``EfficientDetConfig.normalization``).

    Returns:
      The json records: ``{"file", "image_size" [h,w], "detections": [{"box_yxyx", "score",
      "class", "class_name"}]}`` per readable image, ``{"file", "error"}`` per unreadable one.
    """
    os.makedirs(output_dir, exist_ok=True)
    records: list[dict] = []
    loaded: list[tuple[str, np.ndarray]] = []
    for path in paths:
        try:
            image, _ = read_rgb(path)
        except UnreadableImageError as e:
            log.warning("%s; skipped", e)
            records.append({"file": path, "error": str(e)})
            continue
        loaded.append((path, image))
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        inputs = [preprocess_for_eval(img, image_size, normalization) for _, img in chunk]
        batch = np.zeros((batch_size, image_size, image_size, 3), np.float32)
        batch[: len(chunk)] = np.stack([x for x, _ in inputs])
        boxes, scores, classes, valid = (np.asarray(v) for v in detect_fn(batch))
        for b, ((path, image), (_, scale)) in enumerate(zip(chunk, inputs, strict=True)):
            n = int(valid[b])
            h, w = image.shape[:2]
            orig = np.clip(boxes[b, :n] * scale, 0.0, [h, w, h, w])
            cls = classes[b, :n].astype(np.int64)
            canvas = draw_detections(image, orig, scores[b, :n], cls, class_names,
                                     score_threshold)
            stem = os.path.splitext(os.path.basename(path))[0]
            canvas.save(os.path.join(output_dir, f"{stem}.png"))
            records.append({
                "file": path,
                "image_size": [h, w],
                "detections": [
                    {"box_yxyx": [round(float(v), 2) for v in orig[k]],
                     "score": round(float(scores[b, k]), 5), "class": int(cls[k]),
                     "class_name": _name(int(cls[k]), class_names)}
                    for k in range(n)
                ],
            })
    with open(os.path.join(output_dir, "detections.json"), "w") as f:
        json.dump(records, f, indent=1)
    return records
