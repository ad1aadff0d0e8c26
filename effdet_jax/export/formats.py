"""One writer and one runner per export format, each with the format's maintained library.

* ``stablehlo``: ``jax.export`` (serialized StableHLO; ``jax.export.deserialize`` reloads it);
* ``onnx``: ``jax2onnx``, run with ``onnxruntime``;
* ``savedmodel`` and ``tflite``: converted from the ONNX file by onnx2tf in its own venv
  (:mod:`effdet_jax.export.litert`): a SavedModel of plain TF ops with a ``serving_default``
  signature, run with TensorFlow, and a LiteRT file (float32, float16 or int8), run with
  ``ai_edge_litert``; with NMS, TF's own NMS ops around the raw outputs
  (:mod:`effdet_jax.export.tf_nms`). (``jax2tf`` would embed the StableHLO in one ``XlaCallModule`` op, which
  TensorFlow 2.21 cannot read from jax 0.12: its XLA takes StableHLO up to v1.13.7, jax writes
  v1.18; TF's LiteRT converter cannot lower that op either.)

Writers take the serving function (``serving.make_serving_fn``) and the input spec
``jax.ShapeDtypeStruct`` uint8 ``[batch, height, width, 3]`` (``batch`` may be symbolic); runners
take the written path and uint8 images and return numpy outputs in the serving function's order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from effdet_jax.export.options import FILE_NAMES, FORMATS


class FormatUnavailableError(RuntimeError):
    """A format that cannot be produced for this model or option; the message says why."""


def input_spec(batch_size: int | None, height: int, width: int) -> jax.ShapeDtypeStruct:
    """uint8 ``[batch, height, width, 3]``; ``batch_size`` ``None`` gives a symbolic batch ``b``."""
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else batch_size
    return jax.ShapeDtypeStruct((batch, height, width, 3), np.uint8)


def export_stablehlo(fn: Callable, spec: jax.ShapeDtypeStruct) -> jax.export.Exported:
    """``jax.export`` of ``fn`` for CPU and CUDA (the graph has no platform-dependent code)."""
    return jax.export.export(jax.jit(fn), platforms=("cpu", "cuda"))(spec)


def write_stablehlo(fn: Callable, spec: jax.ShapeDtypeStruct, path: str, names: Sequence[str]) -> None:
    del names  # outputs keep the serving function's order
    with open(path, "wb") as f:
        f.write(export_stablehlo(fn, spec).serialize())


def save_stablehlo(exported: jax.export.Exported, output_dir: str) -> str:
    """Writes an already exported program as the ``stablehlo`` file; returns its path."""
    path = os.path.join(output_dir, FILE_NAMES["stablehlo"])
    with open(path, "wb") as f:
        f.write(exported.serialize())
    return path


def run_stablehlo(path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return [np.asarray(x) for x in exported.call(images)]


def write_onnx(fn: Callable, spec: jax.ShapeDtypeStruct, path: str, names: Sequence[str]) -> None:
    try:
        import jax2onnx
    except ImportError as e:
        raise FormatUnavailableError(
            f"onnx: jax2onnx is not installed ({e}); pip install -e '.[export]'"
        ) from e
    from effdet_jax.export.jaxpr_rewrite import for_onnx

    # jax2onnx logs a traceback for each of its optional plugins (equinox, dm-pix) it cannot import.
    logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)

    model = jax2onnx.to_onnx(
        for_onnx(fn, spec), [spec], model_name="efficientdet", input_names=["images"],
        output_names=list(names),
    )
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def run_onnx(path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(list(names), {"images": images})


def write_converted(
    wanted: Sequence[str],
    onnx_path: str,
    output_dir: str,
    dtype: str = "float32",
    calibration: np.ndarray | None = None,
) -> dict[str, str]:
    """``savedmodel`` and / or ``tflite`` (``wanted``) converted from the ONNX file by onnx2tf in
    one run (:mod:`effdet_jax.export.litert`); returns format -> written path. ``dtype`` applies
    to the LiteRT file (the SavedModel is float32); ``int8`` calibrates on ``calibration``.
    Raw outputs only (onnx2tf cannot convert the ONNX file's NMS loop); with NMS,
    ``tf_nms.convert_with_nms`` wraps the raw SavedModel in TF's NMS."""
    from effdet_jax.export import litert

    try:
        litert.venv_python()
    except litert.ConverterMissingError as e:
        raise FormatUnavailableError(f"{', '.join(wanted)}: {e}") from e
    paths = {fmt: os.path.join(output_dir, FILE_NAMES[fmt]) for fmt in wanted}
    try:
        litert.convert(onnx_path, output_dir, savedmodel_path=paths.get("savedmodel"),
                       tflite_path=paths.get("tflite"), dtype=dtype, calibration=calibration)
    except RuntimeError as e:
        raise FormatUnavailableError(f"{', '.join(wanted)}: {e}") from e
    return paths


def run_savedmodel(path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    import tensorflow as tf

    from effdet_jax.export import litert

    outputs = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    return [x.numpy() for x in litert.outputs_in_order(outputs, names)]


def run_tflite(path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    from effdet_jax.export import litert

    return litert.run_tflite(path, images, names)[0]


# Formats written from the serving function; the others are converted from the ONNX file.
WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx}
CONVERTED = ("savedmodel", "tflite")
RUNNERS = {"stablehlo": run_stablehlo, "onnx": run_onnx, "savedmodel": run_savedmodel,
           "tflite": run_tflite}
assert set(WRITERS) | set(CONVERTED) == set(RUNNERS) == set(FORMATS)


def write(fmt: str, fn: Callable, spec: jax.ShapeDtypeStruct, output_dir: str,
          names: Sequence[str]) -> str:
    """Writes ``fn`` as ``fmt`` into ``output_dir``; returns the written path."""
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    WRITERS[fmt](fn, spec, path, names)
    return path


def run(fmt: str, path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Runs an exported file in its own runtime on uint8 ``images``; outputs in ``names`` order."""
    return RUNNERS[fmt](path, images, names)
