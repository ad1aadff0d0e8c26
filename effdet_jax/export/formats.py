"""One writer and one runner per export format, each with the format's maintained library.

* ``stablehlo``: ``jax.export`` (serialized StableHLO; ``jax.export.deserialize`` reloads it);
* ``onnx``: ``jax2onnx``, run with ``onnxruntime``;
* ``savedmodel``: ``jax.experimental.jax2tf`` in a ``tf.Module`` with a ``serving_default``
  signature, run with TensorFlow (the graph is one ``XlaCallModule`` op holding the StableHLO;
  a TensorFlow whose XLA is older than jax's StableHLO cannot run it, and the writer says so);
* ``tflite``: not produced; :func:`write` raises :class:`FormatUnavailableError` saying why.

Writers take the serving function (``serving.make_serving_fn``) and the input spec
``jax.ShapeDtypeStruct`` uint8 ``[batch, height, width, 3]`` (``batch`` may be symbolic); runners
take the written path and uint8 images and return numpy outputs in the serving function's order.
"""

from __future__ import annotations

import logging
import os
import shutil
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


def _is_dynamic(spec: jax.ShapeDtypeStruct) -> bool:
    return not isinstance(spec.shape[0], int)


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


def write_savedmodel(fn: Callable, spec: jax.ShapeDtypeStruct, path: str, names: Sequence[str]) -> None:
    import tensorflow as tf
    from jax.experimental import jax2tf

    dynamic = _is_dynamic(spec)
    converted = jax2tf.convert(
        fn, polymorphic_shapes=["(b, ...)"] if dynamic else None, with_gradient=False,
        native_serialization_platforms=("cpu", "cuda"),
    )
    module = tf.Module()
    signature = tf.TensorSpec((None if dynamic else spec.shape[0], *spec.shape[1:]), tf.uint8,
                              name="images")

    @tf.function(input_signature=[signature], autograph=False)
    def serving_default(images):
        return dict(zip(names, converted(images), strict=True))

    module.serving_default = serving_default
    tf.saved_model.save(module, path, signatures={"serving_default": serving_default})
    # TensorFlow reads the embedded StableHLO only up to the version its XLA knows: a SavedModel
    # it cannot run is removed and reported, not left behind.
    try:
        run_savedmodel(path, np.zeros((spec.shape[0] if not dynamic else 1, *spec.shape[1:]),
                                      np.uint8), names)
    except tf.errors.OpError as e:
        shutil.rmtree(path, ignore_errors=True)
        lines = str(e).splitlines()
        reason = next((line for line in lines if "failed to deserialize" in line),
                      next((line for line in lines if "StableHLO" in line), str(e)[:300]))
        raise FormatUnavailableError(
            f"savedmodel: TensorFlow {tf.__version__} cannot run the StableHLO jax {jax.__version__} "
            f"embeds ({reason.strip()}); use a TensorFlow whose XlaCallModule reads it, or export "
            "stablehlo / onnx"
        ) from e


def run_savedmodel(path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    import tensorflow as tf

    outputs = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    return [outputs[k].numpy() for k in names]


def write_tflite(fn: Callable, spec: jax.ShapeDtypeStruct, path: str, names: Sequence[str]) -> None:
    raise FormatUnavailableError(
        "tflite: LiteRT conversion is not implemented: the maintained converters (onnx2tf from the "
        "ONNX file, or TF's converter from a SavedModel, which here holds one XlaCallModule op "
        "TF's converter cannot lower) are not part of this installation; export 'stablehlo' or "
        "'onnx' instead"
    )


WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx, "savedmodel": write_savedmodel,
           "tflite": write_tflite}
RUNNERS = {"stablehlo": run_stablehlo, "onnx": run_onnx, "savedmodel": run_savedmodel}
assert set(WRITERS) == set(FORMATS)


def write(fmt: str, fn: Callable, spec: jax.ShapeDtypeStruct, output_dir: str,
          names: Sequence[str]) -> str:
    """Writes ``fn`` as ``fmt`` into ``output_dir``; returns the written path."""
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    WRITERS[fmt](fn, spec, path, names)
    return path


def run(fmt: str, path: str, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Runs an exported file in its own runtime on uint8 ``images``; outputs in ``names`` order."""
    return RUNNERS[fmt](path, images, names)
