"""LiteRT (``.tflite``) and TF SavedModel files converted from the ONNX export by ``onnx2tf``, and
the LiteRT runner (``ai_edge_litert``).

onnx2tf pins numpy, onnx, onnxruntime and protobuf to other versions than this project's, so it
runs in its own venv (``make onnx2tf`` builds ``~/.cache/effdet_jax/onnx2tf-venv``;
``EFFDET_JAX_ONNX2TF_VENV`` names another), called as a subprocess, as the PyTorch reference
side is. The LiteRT interpreter comes with it and runs there too (``tools/onnx2tf/run_tflite.py``);
the SavedModel holds plain TF ops and runs with this project's TensorFlow.

Input of every converted file: uint8 ``[batch, height, width, 3]`` (``-kat`` keeps the layout; the
normalisation is inside, as in the ONNX file). Outputs keep the ONNX names and order.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np

ENV_VAR = "EFFDET_JAX_ONNX2TF_VENV"
DEFAULT_VENV = pathlib.Path.home() / ".cache" / "effdet_jax" / "onnx2tf-venv"
TOOLS = pathlib.Path(__file__).resolve().parents[2] / "tools" / "onnx2tf"
RUN_TFLITE = TOOLS / "run_tflite.py"
ONNX2TF_CLI = TOOLS / "onnx2tf_cli.py"
# A guard against a hung converter, not an expected duration (D0 at 512 px converts in about a
# minute on a 2-core machine).
TIMEOUT_S = 3600


class ConverterMissingError(RuntimeError):
    """The onnx2tf venv is not there; the message names the ``make`` target that builds it."""


def venv_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get(ENV_VAR) or DEFAULT_VENV)


def venv_python() -> pathlib.Path:
    """The onnx2tf venv's Python; raises :class:`ConverterMissingError` naming the fix."""
    python = venv_dir() / "bin" / "python"
    if not (venv_dir() / "bin" / "onnx2tf").exists():
        raise ConverterMissingError(
            f"the onnx2tf venv {venv_dir()} is missing (savedmodel and tflite are converted from the "
            f"ONNX file by onnx2tf in its own venv): run `make onnx2tf`, or set {ENV_VAR} to a venv "
            "with `pip install -r tools/onnx2tf/requirements.txt`"
        )
    return python


def convert(
    onnx_path: str,
    output_dir: str,
    *,
    savedmodel_path: str | None,
    tflite_path: str | None,
    dtype: str = "float32",
    calibration: np.ndarray | None = None,
) -> None:
    """Converts ``onnx_path`` with onnx2tf into ``savedmodel_path`` (a folder) and / or
    ``tflite_path`` (``dtype`` one of ``options.DTYPES``; ``int8``: calibrated on
    ``calibration``, uint8 ``[N, H, W, 3]`` images). Raises ``RuntimeError`` with onnx2tf's
    last lines when it fails.

    One onnx2tf run with its default ``flatbuffer_direct`` backend, which writes the float32
    LiteRT file from its own model IR and, with ``-fdosm``, a SavedModel that runs the same ops
    as TF ops (through ``tools/onnx2tf/onnx2tf_cli.py``, which fixes how onnx2tf 2.6.9 calls
    ``tf.nn.depthwise_conv2d`` there). Both match JAX at full size (D0 512: LiteRT 2.5e-5,
    SavedModel 1.7e-5 of the output scale) in about a minute. The float16 and int8 LiteRT files
    come from TensorFlow's converter on that SavedModel (:func:`quantize`): flatbuffer_direct's
    own float16 file computes in float16, which LiteRT's CPU convolution kernels reject.
    (onnx2tf's other backend, ``tf_converter``, is off at full size: D0 512 2.17 of the output
    scale after an hour of its strict mode.)
    """
    python = venv_python()
    if dtype == "int8" and (calibration is None or not len(calibration)):
        raise ValueError("int8 LiteRT needs calibration images (uint8 [N, H, W, 3])")
    # onnx2tf calls the onnxsim executable of its venv by name.
    env = {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}
    need_savedmodel = bool(savedmodel_path) or (bool(tflite_path) and dtype != "float32")
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        # ``-kat images``: the uint8 NHWC input keeps its layout; ``-n``: no onnxsim rewrite
        # of the already simplified graph; ``-dsm``: no strict-mode accuracy pass (a
        # tf_converter feature; every written file is checked against JAX instead).
        # (``-coion``, which renames the outputs after conversion, mixes up outputs of one shape.)
        args = [str(python), str(ONNX2TF_CLI), "-i", onnx_path, "-o", work, "-kat", "images",
                "-n", "-dsm", *(["-fdosm"] if need_savedmodel else [])]
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        float32 = os.path.join(work, pathlib.Path(onnx_path).stem + "_float32.tflite")
        _check(done, onnx_path, [*([float32] if tflite_path else []),
                                 *([os.path.join(work, "saved_model.pb")] if need_savedmodel else [])])
        if tflite_path:
            if dtype == "float32":
                shutil.move(float32, tflite_path)
            else:
                quantize(work, tflite_path, dtype, calibration)
        if savedmodel_path:
            shutil.rmtree(savedmodel_path, ignore_errors=True)
            os.makedirs(savedmodel_path)
            for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
                if os.path.exists(os.path.join(work, name)):
                    shutil.move(os.path.join(work, name), os.path.join(savedmodel_path, name))


def _check(done: subprocess.CompletedProcess, onnx_path: str, expected: Sequence[str]) -> None:
    """Raises ``RuntimeError`` with onnx2tf's last lines unless it succeeded and wrote every
    path of ``expected``."""
    if done.returncode != 0 or not all(os.path.exists(p) for p in expected):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"onnx2tf failed on {onnx_path} (exit {done.returncode}):\n{tail}")


def quantize(saved_model: str, path: str, dtype: str, calibration: np.ndarray | None) -> None:
    """A float16 or int8 LiteRT file from onnx2tf's SavedModel with TensorFlow's converter.
    ``float16``: float16 weights, dequantized to float32 at load, float32 compute. ``int8``:
    int8 weights and activations (float kernels where an op has no int8 one), calibrated on
    ``calibration`` (uint8 ``[N, H, W, 3]``, fed in batches of the SavedModel's input). The
    uint8 input and float32 outputs stay.

    (onnx2tf's own ``-oiqt`` feeds float32 calibration data, which a uint8 input refuses.)
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if dtype == "float16":
        converter.target_spec.supported_types = [tf.float16]
    else:
        signature = tf.saved_model.load(saved_model).signatures["serving_default"]
        batch = signature.structured_input_signature[1]["images"].shape[0] or 1
        converter.representative_dataset = lambda: (
            [calibration[i:i + batch]] for i in range(0, len(calibration) - batch + 1, batch))
    with open(path, "wb") as f:
        f.write(converter.convert())


def outputs_in_order(outputs: dict, names: Sequence[str]) -> list:
    """``outputs`` (a signature's name -> value) in ``names`` order: by name, or by the
    ``output_<i>`` keys TensorFlow gives a SavedModel converted from the ONNX outputs."""
    keys = list(names)
    if not all(k in outputs for k in keys):
        keys = [f"output_{i}" for i in range(len(names))]
    missing = [k for k in keys if k not in outputs]
    if missing:
        raise RuntimeError(f"outputs {list(names)} not found; the file has {sorted(outputs)}")
    return [outputs[k] for k in keys]


def run_tflite(path: str, images: np.ndarray, names: Sequence[str], repeats: int = 0,
               delegates: bool = True) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Runs ``path`` with LiteRT in the onnx2tf venv on uint8 ``images``; returns the outputs in
    ``names`` order and, with ``repeats``, the latency of each timed run in ms. ``delegates``
    ``False``: LiteRT's builtin kernels without its default XNNPACK delegate."""
    python = venv_python()
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "images.npy"), os.path.join(tmp, "outputs.npz")
        np.save(inputs, images)
        done = subprocess.run([str(python), str(RUN_TFLITE), path, inputs, outputs,
                               f"--repeats={repeats}", *([] if delegates else ["--no-delegates"])],
                              capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"LiteRT failed on {path}:\n{done.stderr[-3000:]}")
        with np.load(outputs) as out:
            arrays = {k: out[k] for k in out.files}
        return outputs_in_order(arrays, names), arrays.get("__latency_ms__")
