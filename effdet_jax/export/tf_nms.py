"""NMS for the TF SavedModel and LiteRT files: TensorFlow ops around onnx2tf's raw-output
SavedModel (onnx2tf cannot convert the NMS loop of the ONNX file).

:func:`write_savedmodel` wraps the raw SavedModel (input ``images`` uint8 ``[B, H, W, 3]``,
outputs ``cls_L`` ``[B, H_L, W_L, A * C]`` then ``box_L`` ``[B, H_L, W_L, A * 4]``, anchor-major
channels as ``detection.targets.flatten_level_outputs`` reads them) in the post-processing of
``config.eval.postprocess`` written with TensorFlow's own ops: the same candidates
(``max_class`` / ``top_pairs``, ``pre_nms_top_k``), the box decoding of ``detection.box_coder``
on the model's anchors (yxyx network-input pixels), sigmoid scores, and TF's
``NonMaxSuppressionV5`` (hard, or Gaussian soft-NMS with ``soft_nms_sigma = sigma / 2``, as
automl calls it; ``detection.postprocess.nms`` is its eager form), then clipping and scaling.
Its ``serving_default`` signature gives ``boxes [B, D, 4]`` float32 ``[ymin, xmin, ymax, xmax]``
in input pixels, ``scores [B, D]``, ``classes [B, D]`` int32 (-1 on padding rows) and
``valid [B]`` int32. A fixed batch is unrolled image by image; a dynamic one (``B`` ``None`` in
the raw SavedModel's signature) runs the per-image post-processing in ``tf.map_fn``, a While loop
over the images; its LiteRT file runs the batch-1 network and the NMS of each image in one step
of that loop (``per_image_network``). :func:`write_tflite` converts it with TensorFlow's LiteRT converter:
``NonMaxSuppressionV5`` becomes LiteRT's builtin ``NON_MAX_SUPPRESSION_V5`` and the loop its
builtin ``WHILE`` (no select TF ops).

Not every configuration has a TF equivalent: ``options.nms_unsupported_reason`` names the ones
refused.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from effdet_jax.detection import anchors as anchors_lib
from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.export import letterbox as letterbox_lib
from effdet_jax.export import serving
from effdet_jax.export.options import FILE_NAMES, ExportOptions, nms_unsupported_reason
from effdet_jax.export.serving import NMS_OUTPUTS
from effdet_jax.models.efficientdet import EfficientDet


@dataclasses.dataclass(frozen=True)
class NmsGraph:
    """What the TF post-processing needs besides :class:`PostprocessConfig`.

    Attributes:
      anchors: ``[A, 4]`` float32 yxyx in network-input pixels, in the raw outputs' row order.
      num_classes: ``C``.
      image_hw: the network input ``(height, width)`` (boxes are clipped to it when the config
        clips).
      image_scale: input pixels per network-input pixel (1 without letterboxing).
      input_hw: ``(height, width)`` of the exported input when letterboxed (boxes are clipped to
        it after scaling), else ``None``.
    """

    anchors: np.ndarray
    num_classes: int
    image_hw: tuple[int, int]
    image_scale: float = 1.0
    input_hw: tuple[int, int] | None = None


def nms_graph(model: EfficientDet, input_size: tuple[int, int] | None) -> NmsGraph:
    """The :class:`NmsGraph` of ``model`` exported at ``input_size`` (``None``: its own size;
    another size is letterboxed, ``export.letterbox``)."""
    cfg = serving.plain_model(model).config
    anchors = np.asarray(anchors_lib.generate_anchors(cfg.anchor_config()), np.float32)
    size = serving.image_size(model)
    if input_size is None or tuple(input_size) == size:
        return NmsGraph(anchors, cfg.num_classes, size)
    geo = letterbox_lib.geometry(tuple(input_size), size[0])
    return NmsGraph(anchors, cfg.num_classes, size, geo.image_scale, geo.input_hw)


def _detect_one(tf, logits, deltas, graph: NmsGraph, config: PostprocessConfig):
    """One image: ``logits [N, C]``, ``deltas [N, 4]`` -> boxes, scores, classes, valid."""
    total = int(logits.shape[0])
    k = total if config.pre_nms_top_k <= 0 else min(config.pre_nms_top_k, total)
    best = tf.reduce_max(logits, axis=-1)
    top_logits, anchor_idx = tf.math.top_k(best, k=k, sorted=True)
    rows = tf.gather(logits, anchor_idx)
    if config.candidates == "max_class":
        classes = tf.argmax(rows, axis=-1, output_type=tf.int32)
    else:
        c = graph.num_classes
        k_pairs = total * c if config.pre_nms_top_k <= 0 else min(config.pre_nms_top_k, total * c)
        top_logits, pos = tf.math.top_k(tf.reshape(rows, [-1]), k=k_pairs, sorted=True)
        anchor_idx = tf.gather(anchor_idx, pos // c)
        classes = pos % c
    anchors = tf.gather(tf.constant(graph.anchors, tf.float32), anchor_idx)
    d = tf.gather(deltas, anchor_idx)
    # detection.box_coder.decode
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    yca, xca = (anchors[:, 0] + anchors[:, 2]) / 2.0, (anchors[:, 1] + anchors[:, 3]) / 2.0
    h, w = tf.exp(d[:, 2]) * ha, tf.exp(d[:, 3]) * wa
    yc, xc = d[:, 0] * ha + yca, d[:, 1] * wa + xca
    boxes = tf.stack([yc - h / 2.0, xc - w / 2.0, yc + h / 2.0, xc + w / 2.0], axis=-1)
    scores = tf.sigmoid(top_logits)
    soft = config.method == "soft_gaussian"
    picked, picked_scores, valid = tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes, scores=scores, max_output_size=config.max_detections,
        # automl: Gaussian soft-NMS with no hard cut (IoU threshold 1) and TF's sigma convention.
        iou_threshold=1.0 if soft else config.iou_threshold,
        score_threshold=config.effective_score_threshold,
        soft_nms_sigma=config.sigma / 2.0 if soft else 0.0,
        pad_to_max_output_size=True)
    is_valid = tf.range(config.max_detections) < valid
    out_boxes = tf.gather(boxes, picked)
    if config.effective_clip:
        hgt, wid = graph.image_hw
        out_boxes = tf.clip_by_value(out_boxes, 0.0, tf.constant([hgt, wid, hgt, wid], tf.float32))
    out_boxes = out_boxes * graph.image_scale
    if graph.input_hw is not None:
        hgt, wid = graph.input_hw
        out_boxes = tf.clip_by_value(out_boxes, 0.0, tf.constant([hgt, wid, hgt, wid], tf.float32))
    out_boxes = tf.where(is_valid[:, None], out_boxes, 0.0)
    return (out_boxes, tf.where(is_valid, picked_scores, 0.0),
            tf.where(is_valid, tf.gather(classes, picked), -1), valid)


def write_savedmodel(raw_savedmodel: str, path: str, raw_names: Sequence[str], graph: NmsGraph,
                     config: PostprocessConfig, per_image_network: bool = False) -> None:
    """Writes the SavedModel with NMS to ``path`` (a folder) from onnx2tf's raw one.

    ``per_image_network``: the raw SavedModel takes one image (batch 1) and the written one any
    number, running the network and the NMS of each image in one step of the While loop. That is
    the LiteRT form of a dynamic batch: onnx2tf's dynamic-batch graph leaves the convolutions'
    input shapes unknown (``[?, ?, ?, ?]``), which TF's LiteRT converter cannot lower.
    """
    import tensorflow as tf

    from effdet_jax.export import litert

    raw = tf.saved_model.load(raw_savedmodel)
    signature = raw.signatures["serving_default"]
    spec = signature.structured_input_signature[1]["images"]
    if per_image_network and spec.shape[0] != 1:
        raise ValueError(f"per_image_network needs a batch-1 raw SavedModel, not {spec.shape}")
    batch = None if per_image_network else spec.shape[0]  # None: a dynamic batch
    n_levels = len(raw_names) // 2
    d = config.max_detections
    per_image_spec = (tf.TensorSpec([d, 4], tf.float32), tf.TensorSpec([d], tf.float32),
                      tf.TensorSpec([d], tf.int32), tf.TensorSpec([], tf.int32))

    def flat(outputs, channels):
        """``[B, H_L, W_L, A * channels]`` per level -> ``[B, N, channels]``."""
        return tf.concat([tf.reshape(x, [-1, x.shape[1] * x.shape[2] * x.shape[3] // channels,
                                         channels]) for x in outputs], axis=1)

    class WithNms(tf.Module):
        def __init__(self):
            super().__init__()
            self.raw = raw

        def network(self, images):
            """``(logits [B, N, C], deltas [B, N, 4])`` of uint8 ``images`` ``[B, H, W, 3]``."""
            outs = litert.outputs_in_order(self.raw.signatures["serving_default"](images=images),
                                           raw_names)
            return flat(outs[:n_levels], graph.num_classes), flat(outs[n_levels:], 4)

        @tf.function(input_signature=[tf.TensorSpec([batch, *spec.shape[1:]], tf.uint8,
                                                    name="images")])
        def serve(self, images):
            if per_image_network:
                def detect(image):
                    logits, deltas = self.network(image[None])
                    return _detect_one(tf, logits[0], deltas[0], graph, config)

                stacked = tf.map_fn(detect, images, fn_output_signature=per_image_spec)
            elif batch is None:
                # One image per step of a While loop (LiteRT's builtin WHILE): TF's NMS takes one
                # image, and the loop runs as many steps as the input has images.
                logits, deltas = self.network(images)
                stacked = tf.map_fn(lambda x: _detect_one(tf, x[0], x[1], graph, config),
                                    (logits, deltas), fn_output_signature=per_image_spec)
            else:
                logits, deltas = self.network(images)
                per_image = [_detect_one(tf, logits[i], deltas[i], graph, config)
                             for i in range(batch)]
                stacked = [tf.stack([det[j] for det in per_image]) for j in range(4)]
            return dict(zip(NMS_OUTPUTS, stacked, strict=True))

    module = WithNms()
    tf.saved_model.save(module, path,
                        signatures={"serving_default": module.serve.get_concrete_function()})


def write_tflite(savedmodel: str, path: str) -> None:
    """float32 LiteRT file of the SavedModel with NMS (TF's converter, builtin ops only)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(converter.convert())


def convert_with_nms(
    wanted: Sequence[str],
    model: EfficientDet,
    variables: dict[str, Any],
    options: ExportOptions,
    config: PostprocessConfig,
    output_dir: str,
) -> dict[str, str]:
    """``savedmodel`` and / or ``tflite`` (``wanted``) with NMS: the raw-output ONNX file (written
    in a temporary folder) through onnx2tf to a raw SavedModel, wrapped by
    :func:`write_savedmodel`, converted by :func:`write_tflite`; returns format -> written path.
    Raises :class:`formats.FormatUnavailableError` naming the reason when it cannot be built."""
    from effdet_jax.export import formats, litert

    label = ", ".join(wanted)
    reason = nms_unsupported_reason(config, options.dtype if "tflite" in wanted else "float32")
    if reason:
        raise formats.FormatUnavailableError(f"{label} with NMS: {reason}")
    try:
        litert.venv_python()
    except litert.ConverterMissingError as e:
        raise formats.FormatUnavailableError(f"{label}: {e}") from e
    paths = {fmt: os.path.join(output_dir, FILE_NAMES[fmt]) for fmt in wanted}
    raw_fn = serving.make_serving_fn(model, variables, None, options.input_size)
    raw_names = serving.output_names(model, False)
    height, width = options.input_size or serving.image_size(model)
    nms = nms_graph(model, options.input_size)

    def raw_savedmodel(batch_size: int | None, tmp: str) -> str:
        """onnx2tf's raw-output SavedModel of the network at ``batch_size`` in ``tmp``."""
        onnx_path = formats.write("onnx", raw_fn, formats.input_spec(batch_size, height, width),
                                  tmp, raw_names)
        raw = os.path.join(tmp, "raw_saved_model")
        try:
            litert.convert(onnx_path, tmp, savedmodel_path=raw, tflite_path=None)
        except RuntimeError as e:
            raise formats.FormatUnavailableError(f"{label}: {e}") from e
        return raw

    # A dynamic batch's LiteRT file runs the batch-1 network per image (see write_savedmodel).
    per_image_tflite = "tflite" in paths and options.batch_size is None
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        if "savedmodel" in paths or not per_image_tflite:
            savedmodel = paths.get("savedmodel") or os.path.join(tmp, "saved_model")
            shutil.rmtree(savedmodel, ignore_errors=True)
            write_savedmodel(raw_savedmodel(options.batch_size, tmp), savedmodel, raw_names, nms,
                             config)
        if per_image_tflite:
            per_image_dir = os.path.join(tmp, "per_image")
            os.makedirs(per_image_dir)
            savedmodel = os.path.join(per_image_dir, "saved_model")
            write_savedmodel(raw_savedmodel(1, per_image_dir), savedmodel, raw_names, nms, config,
                             per_image_network=True)
        if "tflite" in paths:
            write_tflite(savedmodel, paths["tflite"])
    return paths
