"""What ``--mode=export`` can write, and its options parsed from ``config.export``.

Kept free of heavy imports (no TensorFlow, no converters) so ``config_validation`` can use it.
"""

from __future__ import annotations

import dataclasses

# Every export format, in the order they are written. ``tflite`` is converted from the ONNX file.
FORMATS = ("stablehlo", "onnx", "savedmodel", "tflite")
DTYPES = ("float32", "float16", "int8")
DYNAMIC = "dynamic"
# File each format writes inside the output folder.
FILE_NAMES = {
    "stablehlo": "model.stablehlo",
    "onnx": "model.onnx",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
}


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Parsed ``config.export``.

    Attributes:
      formats: a subset of :data:`FORMATS`, in that order.
      batch_size: the exported batch dimension; ``None`` for a dynamic (symbolic) batch.
      with_nms: outputs after the configured post-processing (boxes / scores / classes / valid)
        instead of the raw per-level outputs.
      dtype: one of :data:`DTYPES`: the LiteRT file's (``int8`` calibrated on images of the
        configured eval data); every other format is float32.
      input_size: ``(height, width)`` of the exported input when it is not the model's size:
        the graph letterboxes it (``export.letterbox``); ``None``: the model's size.
    """

    formats: tuple[str, ...]
    batch_size: int | None
    with_nms: bool
    dtype: str
    input_size: tuple[int, int] | None = None


def parse_formats(text: str) -> tuple[str, ...]:
    """``"stablehlo,onnx"`` -> ``("stablehlo", "onnx")``; unknown names raise ``ValueError``."""
    names = [f.strip() for f in str(text).split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ValueError(
            f"config.export.formats={text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'};"
            f" give a comma-separated subset of {', '.join(FORMATS)}, e.g. "
            "--config.export.formats=stablehlo,onnx"
        )
    return tuple(f for f in FORMATS if f in names)


def parse_batch_size(text: str | int) -> int | None:
    """``"dynamic"`` -> ``None``; a positive integer (or its string) -> that integer."""
    if str(text).strip() == DYNAMIC:
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"config.export.batch_size={text!r}: give a positive integer or '{DYNAMIC}', e.g. "
            "--config.export.batch_size=1"
        )
    return value


def parse_input_size(text: str) -> tuple[int, int] | None:
    """``""`` -> ``None`` (the model's size); ``"480x640"`` -> ``(480, 640)`` (height x width)."""
    text = str(text or "").strip()
    if not text:
        return None
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        height = width = 0
    if height < 1 or width < 1:
        raise ValueError(
            f"config.export.input_size={text!r}: give HEIGHTxWIDTH in pixels, e.g. "
            "--config.export.input_size=480x640, or '' for the model's image size"
        )
    return height, width


def nms_unsupported_reason(config, dtype: str = "float32") -> str | None:
    """Why a SavedModel / LiteRT file with NMS (``export.tf_nms``: TensorFlow's
    ``NonMaxSuppressionV5``) cannot be written for ``config`` (a ``PostprocessConfig`` or
    ``config.eval.postprocess``) and LiteRT ``dtype``; else ``None``. Any batch, fixed or
    dynamic, is written."""
    if dtype != "float32":
        return (f"config.export.dtype={dtype!r} LiteRT files are written with raw outputs only "
                "(TF's NMS takes float32 boxes and scores): use --config.export.with_nms=false and "
                "apply effdet_jax.detection.postprocess to the raw outputs")
    if config.method == "soft_linear":
        return ("eval.postprocess.method='soft_linear' has no TensorFlow / LiteRT equivalent "
                "(NonMaxSuppressionV5 offers hard and Gaussian soft-NMS): use "
                "--config.eval.postprocess.method=hard or soft_gaussian, or with_nms=false")
    if config.per_class:
        return ("eval.postprocess.per_class=True is not built with TF's NMS (NonMaxSuppressionV5 "
                "is class-agnostic; combined_non_max_suppression is hard-NMS only and LiteRT has no "
                "builtin for it): use --config.eval.postprocess.per_class=false, or with_nms=false")
    return None


def parse_options(export_cfg) -> ExportOptions:
    """:class:`ExportOptions` from ``config.export``; raises ``ValueError`` naming the fix."""
    formats = parse_formats(export_cfg.formats)
    batch_size = parse_batch_size(export_cfg.batch_size)
    if export_cfg.dtype not in DTYPES:
        raise ValueError(f"config.export.dtype={export_cfg.dtype!r}: choose one of {DTYPES}")
    if export_cfg.dtype != "float32" and "tflite" not in formats:
        raise ValueError(
            f"config.export.dtype={export_cfg.dtype!r} applies to LiteRT only (the other formats are "
            "float32): add tflite, e.g. --config.export.formats=tflite"
        )
    return ExportOptions(formats, batch_size, bool(export_cfg.with_nms), export_cfg.dtype,
                         parse_input_size(export_cfg.input_size))
