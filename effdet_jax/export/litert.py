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
import signal
import subprocess
import tempfile
from collections.abc import Sequence

import numpy as np

ENV_VAR = "EFFDET_JAX_ONNX2TF_VENV"
DEFAULT_VENV = pathlib.Path.home() / ".cache" / "effdet_jax" / "onnx2tf-venv"
RUN_TFLITE = pathlib.Path(__file__).resolve().parents[2] / "tools" / "onnx2tf" / "run_tflite.py"
# File name suffix of each LiteRT dtype: onnx2tf's float32 / float16 files, and the int8 one
# :func:`quantize_int8` writes.
TFLITE_SUFFIX = {"float32": "_float32", "float16": "_float16", "int8": "_int8"}
# A guard against a hung converter, not an expected duration: onnx2tf's strict mode on D0 at
# 512 px runs for over an hour on a 2-core machine.
TIMEOUT_S = 6 * 3600


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
    ``tflite_path`` (``dtype`` one of :data:`TFLITE_SUFFIX`; ``int8``: :func:`quantize_int8` on
    ``calibration``, uint8 ``[N, H, W, 3]`` images). Raises ``RuntimeError`` with onnx2tf's
    last lines when it fails.

    Two onnx2tf backends, each where it is right: the float32 LiteRT file comes from
    ``flatbuffer_direct`` (onnx2tf's default: it writes the file from its own model IR, matches
    JAX at full size, D0 512 within 2.5e-5 of the output scale, in about two minutes); the
    SavedModel and the float16 / int8 LiteRT files come from ``tf_converter`` (TensorFlow's
    converter), the only backend that writes them (``flatbuffer_direct``'s own SavedModel
    export, ``-fdosm``, fails on depthwise convolutions with TensorFlow 2.21).
    """
    bin_dir = venv_python().parent
    if dtype == "int8" and (calibration is None or not len(calibration)):
        raise ValueError("int8 LiteRT needs calibration images (uint8 [N, H, W, 3])")
    # onnx2tf calls the onnxsim executable of its venv by name.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "CUDA_VISIBLE_DEVICES": ""}
    # (``-coion``, which renames the outputs after conversion, mixes up outputs of one shape.)
    base = [str(bin_dir / "onnx2tf"), "-i", onnx_path, "-kat", "images", "-n"]
    stem = pathlib.Path(onnx_path).stem
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        if tflite_path and dtype == "float32":
            direct = os.path.join(work, "flatbuffer_direct")
            # ``-dsm``: strict mode is the tf_converter path's layout correction.
            done = subprocess.run([*base, "-o", direct, "-dsm"], capture_output=True, text=True,
                                  timeout=TIMEOUT_S, env=env)
            tflite = os.path.join(direct, stem + TFLITE_SUFFIX["float32"] + ".tflite")
            _check(done, onnx_path, tflite)
            shutil.move(tflite, tflite_path)
        if not (savedmodel_path or dtype != "float32"):
            return
        converted = os.path.join(work, "tf_converter")
        args = [*base, "-o", converted, "-tb", "tf_converter", "-osd"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        if done.returncode == -signal.SIGKILL:
            # Killed for memory: strict mode runs the network op by op on dummy data and holds
            # every activation (15 GB for D0 at 512 px). ``-dsm`` skips that accuracy
            # correction; every written file is checked against JAX either way.
            done = subprocess.run([*args, "-dsm"], capture_output=True, text=True,
                                  timeout=TIMEOUT_S, env=env)
        tflite = os.path.join(converted, stem + TFLITE_SUFFIX[dtype] + ".tflite")
        if done.returncode == 0 and dtype == "int8":
            quantize_int8(converted, tflite, calibration)
        _check(done, onnx_path, tflite if tflite_path and dtype != "float32" else None)
        if tflite_path and dtype != "float32":
            shutil.move(tflite, tflite_path)
        if savedmodel_path:
            shutil.rmtree(savedmodel_path, ignore_errors=True)
            os.makedirs(savedmodel_path)
            for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
                if os.path.exists(os.path.join(converted, name)):
                    shutil.move(os.path.join(converted, name), os.path.join(savedmodel_path, name))


def _check(done: subprocess.CompletedProcess, onnx_path: str, expected: str | None) -> None:
    """Raises ``RuntimeError`` with onnx2tf's last lines unless it succeeded and wrote
    ``expected`` (a path, or ``None``)."""
    if done.returncode != 0 or (expected and not os.path.exists(expected)):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"onnx2tf failed on {onnx_path} (exit {done.returncode}):\n{tail}")


def quantize_int8(saved_model: str, path: str, calibration: np.ndarray | None) -> None:
    """int8 LiteRT from onnx2tf's SavedModel with TensorFlow's converter: int8 weights and
    activations (float kernels where an op has no int8 one), calibrated on ``calibration``
    (uint8 ``[N, H, W, 3]``, fed in batches of the SavedModel's input). The uint8 input and
    float32 outputs stay.

    (onnx2tf's own ``-oiqt`` feeds float32 calibration data, which a uint8 input refuses.)
    """
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model).signatures["serving_default"]
    batch = signature.structured_input_signature[1]["images"].shape[0] or 1
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
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
