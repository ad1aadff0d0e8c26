"""Export a trained EfficientDet: StableHLO, ONNX, TF SavedModel and LiteRT files that take uint8
pixels, each checked against the JAX model in its own runtime.

``export_model(model, variables, options, postprocess_config, output_dir)`` writes the formats
of ``options`` (``options.ExportOptions``), runs each written file on the same uint8 images as
the JAX serving function, and writes ``export.json`` (inputs, outputs, normalisation, parity per
format, which float32 files miss the parity bars (``parity.failures``), and why any format could
not be produced). ``serving`` builds the exported function,
``formats`` holds one writer and runner per format (SavedModel and LiteRT are converted from the
ONNX file, ``litert``), ``graph_check`` checks the graph is plain XLA, ``parity`` measures the
differences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from effdet_jax.detection.postprocess import PostprocessConfig
from effdet_jax.export import formats, graph_check, parity, serving, tf_nms
from effdet_jax.export.options import FORMATS, ExportOptions, parse_options

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "check_images", "export_model", "parse_options"]
MANIFEST = "export.json"


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_model` wrote: ``written`` format -> path, ``unavailable`` format -> why,
    ``parity`` format -> :func:`parity.compare` record, ``parity_failures`` format -> what a
    written float32 file misses of the parity bars (float16 / int8 LiteRT files have no bar)."""

    written: dict[str, str]
    unavailable: dict[str, str]
    parity: dict[str, dict[str, Any]]
    manifest: str
    parity_failures: dict[str, str] = dataclasses.field(default_factory=dict)


def check_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Deterministic uint8 ``[batch, height, width, 3]`` images for the parity check."""
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def _convert_from_onnx(converted, fn, spec, output_dir, names, written, options, calibration):
    """``savedmodel`` / ``tflite`` (raw outputs) from the written ONNX file, or from one written
    for them in a temporary folder when ``onnx`` was not asked for."""
    if "onnx" in written:
        return formats.write_converted(converted, written["onnx"], output_dir, options.dtype,
                                       calibration)
    with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
        onnx_path = formats.write("onnx", fn, spec, tmp, names)
        return formats.write_converted(converted, onnx_path, output_dir, options.dtype, calibration)


def export_model(
    model: Any,
    variables: dict[str, Any],
    options: ExportOptions,
    postprocess_config: PostprocessConfig,
    output_dir: str,
    images: np.ndarray | None = None,
    reference: list[np.ndarray] | None = None,
    calibration: np.ndarray | None = None,
) -> ExportResult:
    """Writes ``options.formats`` of ``model`` with ``variables`` to ``output_dir``.

    ``images``: uint8 ``[B, H, W, 3]`` for the parity check (default :func:`check_images`, batch
    ``options.batch_size`` or 2 for a dynamic batch); ``reference``: the JAX outputs on them, when
    the caller has them (default: the serving function run with ``jax.jit``); ``calibration``:
    uint8 ``[N, H, W, 3]`` images for an int8 LiteRT file. A format that cannot be produced is
    listed in ``unavailable`` with the reason; the others are written. ``options.dtype`` applies
    to ``tflite``; the other formats are float32.
    """
    os.makedirs(output_dir, exist_ok=True)
    fn = serving.make_serving_fn(model, variables, postprocess_config if options.with_nms else None,
                                 options.input_size)
    names = serving.output_names(model, options.with_nms)
    height, width = options.input_size or serving.image_size(model)
    spec = formats.input_spec(options.batch_size, height, width)
    exported = formats.export_stablehlo(fn, spec)
    graph_check.check_plain_xla(fn, spec, exported)
    if images is None:
        images = check_images(options.batch_size or 2, height, width)
    if reference is None:
        reference = [np.asarray(x) for x in jax.jit(fn)(images)]

    written, unavailable, records, failed = {}, {}, {}, {}
    for fmt in options.formats:
        if fmt in formats.CONVERTED:
            continue
        try:
            if fmt == "stablehlo":  # already exported for the check
                written[fmt] = formats.save_stablehlo(exported, output_dir)
            else:
                written[fmt] = formats.write(fmt, fn, spec, output_dir, names)
        except formats.FormatUnavailableError as e:
            unavailable[fmt] = str(e)
    converted = [f for f in options.formats if f in formats.CONVERTED]
    if converted:
        try:
            if options.with_nms:  # TF's NMS around the raw outputs' SavedModel
                written.update(tf_nms.convert_with_nms(converted, model, variables, options,
                                                       postprocess_config, output_dir))
            else:
                written.update(_convert_from_onnx(converted, fn, spec, output_dir, names, written,
                                                  options, calibration))
        except formats.FormatUnavailableError as e:
            unavailable.update({fmt: str(e) for fmt in converted})
    for fmt in [f for f in options.formats if f in written]:
        records[fmt] = parity.compare(reference, formats.run(fmt, written[fmt], images, names),
                                      options.with_nms)
        missed = parity.failures(records[fmt], options.with_nms)
        if missed and (fmt != "tflite" or options.dtype == "float32"):
            failed[fmt] = "; ".join(missed)
    manifest = os.path.join(output_dir, MANIFEST)
    mean_rgb, stddev_rgb = serving.plain_model(model).config.normalization
    with open(manifest, "w") as f:
        json.dump({
            "model": model.config.name,
            "input": {"name": "images", "dtype": "uint8",
                      "shape": [options.batch_size or "batch", height, width, 3],
                      "letterboxed_to": None if options.input_size is None
                      else list(serving.image_size(model)),
                      "normalization_inside": {"mean_rgb": mean_rgb, "stddev_rgb": stddev_rgb}},
            "outputs": list(names),
            "dtype": {fmt: options.dtype if fmt == "tflite" else "float32" for fmt in written},
            "boxes": "[ymin, xmin, ymax, xmax] in input pixels" if options.with_nms else None,
            "files": {k: os.path.basename(v) for k, v in written.items()},
            "parity": records,
            "parity_failures": failed,
            "unavailable": unavailable,
        }, f, indent=2)
    return ExportResult(written, unavailable, records, manifest, failed)
