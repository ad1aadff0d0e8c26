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
RUN_TFLITE = pathlib.Path(__file__).resolve().parents[2] / "tools" / "onnx2tf" / "run_tflite.py"
# onnx2tf's file name suffix of each LiteRT dtype (``-oiqt`` writes the int8 variants; the one
# kept is full-integer weights and activations with float32 input / output, so the uint8 pixels
# and the outputs keep the float32 file's interface).
TFLITE_SUFFIX = {"float32": "_float32", "float16": "_float16", "int8": "_integer_quant"}
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
    ``tflite_path`` (``dtype`` one of :data:`TFLITE_SUFFIX`; ``int8`` calibrates on
    ``calibration``, uint8 ``[N, H, W, 3]`` images). Raises ``RuntimeError`` with onnx2tf's
    last lines when it fails."""
    bin_dir = venv_python().parent
    with tempfile.TemporaryDirectory(dir=output_dir) as work:
        args = [str(bin_dir / "onnx2tf"), "-i", onnx_path, "-o", work, "-kat", "images", "-coion", "-n"]
        if savedmodel_path or dtype != "float32":
            # The SavedModel and the float16 / int8 files come from TensorFlow's converter; the
            # default flatbuffer_direct backend writes float32 LiteRT only (its float16 file keeps
            # float16 activations, which LiteRT's CPU kernels do not run).
            args += ["-tb", "tf_converter", "-osd"]
        if dtype == "int8":
            if calibration is None:
                raise ValueError("int8 LiteRT needs calibration images")
            data = os.path.join(work, "calibration.npy")
            # onnx2tf feeds ``(data - mean) / std`` to the input: 0 / 1 keep the pixels.
            np.save(data, calibration.astype(np.float32))
            args += ["-oiqt", "-cind", "images", data, "[[[[0.0,0.0,0.0]]]]", "[[[[1.0,1.0,1.0]]]]"]
        # onnx2tf calls the onnxsim executable of its venv by name.
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        stem = pathlib.Path(onnx_path).stem
        tflite = os.path.join(work, stem + TFLITE_SUFFIX[dtype] + ".tflite")
        if done.returncode != 0 or (tflite_path and not os.path.exists(tflite)):
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"onnx2tf failed on {onnx_path} (exit {done.returncode}):\n{tail}")
        if tflite_path:
            shutil.move(tflite, tflite_path)
        if savedmodel_path:
            shutil.rmtree(savedmodel_path, ignore_errors=True)
            os.makedirs(savedmodel_path)
            for name in ("saved_model.pb", "variables", "assets", "fingerprint.pb"):
                if os.path.exists(os.path.join(work, name)):
                    shutil.move(os.path.join(work, name), os.path.join(savedmodel_path, name))


def run_tflite(path: str, images: np.ndarray, names: Sequence[str], repeats: int = 0
               ) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Runs ``path`` with LiteRT in the onnx2tf venv on uint8 ``images``; returns the outputs in
    ``names`` order and, with ``repeats``, the latency of each timed run in ms."""
    python = venv_python()
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = os.path.join(tmp, "images.npy"), os.path.join(tmp, "outputs.npz")
        np.save(inputs, images)
        done = subprocess.run([str(python), str(RUN_TFLITE), path, inputs, outputs,
                               f"--repeats={repeats}"], capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise RuntimeError(f"LiteRT failed on {path}:\n{done.stderr[-3000:]}")
        with np.load(outputs) as out:
            missing = [n for n in names if n not in out]
            if missing:
                raise RuntimeError(f"{path} has no outputs {missing}; it has {sorted(out.files)}")
            latency = out["__latency_ms__"] if "__latency_ms__" in out.files else None
            return [out[n] for n in names], latency
