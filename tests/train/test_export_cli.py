"""``main.py --mode=export`` end to end: train the tiny config for 2 steps, export it as
StableHLO and ONNX (plus LiteRT, with its converter's venv pointed at a missing folder), and
check the files, ``export.json`` and the printed parity; then run the ONNX file with onnxruntime
and compare it with the checkpoint's JAX model, restored here, on the same uint8 images."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from train_helpers import subprocess_env

from configs import tiny
from effdet_jax.export import check_images, formats, parity, serving
from effdet_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _main(*args, env):
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config=configs/tiny.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def test_export_cli_writes_checked_files(tmp_path):
    # LiteRT is converted by onnx2tf in its own venv: a missing one is reported with its fix.
    env = dict(subprocess_env(1), EFFDET_JAX_ONNX2TF_VENV=str(tmp_path / "no-onnx2tf-venv"))
    workdir, out = tmp_path / "run", tmp_path / "exported"
    bad = _main(f"--workdir={workdir}", "--mode=export", f"--output={out}",
                "--config.export.formats=stablehlo,tflitex", env=env)
    assert bad.returncode != 0 and "tflitex" in bad.stderr and "stablehlo,onnx" in bad.stderr

    train = _main(f"--workdir={workdir}", "--mode=train", "--config.train.total_steps=2", env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    run = _main(f"--workdir={workdir}", "--mode=export", f"--output={out}",
                "--config.export.formats=stablehlo,onnx,tflite", "--config.export.batch_size=2",
                env=env)
    # LiteRT cannot be produced here: the command fails naming it and the fix, after writing the
    # others.
    assert run.returncode != 0 and "not produced" in run.stderr, run.stderr[-3000:]
    assert "tflite" in run.stderr and "make onnx2tf" in run.stderr
    assert (out / "model.stablehlo").stat().st_size > 0 and (out / "model.onnx").stat().st_size > 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["outputs"] == list(serving.NMS_OUTPUTS)
    assert manifest["input"]["shape"] == [2, 64, 64, 3] and "tflite" in manifest["unavailable"]
    for fmt in ("stablehlo", "onnx"):
        assert f"{fmt}: {out}" in run.stdout and manifest["parity"][fmt]["class_mismatches"] == 0

    # Independent check: the checkpoint's model as evaluation runs it (CPU kernels, detect fn).
    config = tiny.get_config()
    exp, variables = trainer.inference_variables(config, str(workdir))
    # One image per device for the sharded detect; the file (batch 2) takes the first two.
    images = check_images(exp.mesh.shape["data"] * 2, 64, 64, seed=3)
    mean_rgb, stddev_rgb = exp.model.config.normalization
    x = (images.astype(np.float32) - np.float32(mean_rgb)) / np.float32(stddev_rgb)
    with jax.set_mesh(exp.mesh):
        det = jax.device_get(exp.detect(variables, x))
    reference = [np.asarray(det[k])[:2] for k in serving.NMS_OUTPUTS]
    exported = formats.run("onnx", str(out / "model.onnx"), images[:2], serving.NMS_OUTPUTS)
    diff = parity.detection_differences(reference, exported, top_k=20)
    assert diff["class_mismatches"] == 0 and diff["valid_mismatches"] == 0, diff
    assert diff["box_px"] <= 1e-3 and diff["score"] <= 1e-4, diff

    # Another image size: the graph letterboxes 48x80 images and gives boxes in their pixels.
    boxed = tmp_path / "letterboxed"
    run = _main(f"--workdir={workdir}", "--mode=export", f"--output={boxed}",
                "--config.export.formats=stablehlo", "--config.export.batch_size=1",
                "--config.export.input_size=48x80", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((boxed / "export.json").read_text())
    assert manifest["input"]["shape"] == [1, 48, 80, 3], manifest["input"]
    assert manifest["parity"]["stablehlo"]["class_mismatches"] == 0, manifest["parity"]
    boxes, _, _, valid = formats.run("stablehlo", str(boxed / "model.stablehlo"),
                                     check_images(1, 48, 80, seed=4), serving.NMS_OUTPUTS)
    kept = boxes[0, : int(valid[0])]
    assert kept.size and kept.min() >= 0 and kept[:, 2].max() <= 48 and kept[:, 3].max() <= 80, kept
