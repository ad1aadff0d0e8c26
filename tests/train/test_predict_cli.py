"""The predict CLI end to end: train the tiny config for 2 steps through ``main.py``, then
``main.py --mode=predict`` draws the boxes into image files and writes ``detections.json``."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _main(*args, env):
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config=configs/tiny.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def test_predict_cli_writes_images_and_json(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "EFFDET_JAX_TEST_JAX_CACHE", str(pathlib.Path.home() / ".cache/effdet_jax/jax_cache_tests")
    )
    workdir, images, out = tmp_path / "run", tmp_path / "images", tmp_path / "out"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(80, 60), (50, 90)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"im{i}.jpg")

    missing = _main(f"--workdir={workdir}", "--mode=predict", f"--images={images}/*.jpg",
                    f"--output={out}", env=env)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr

    train = _main(f"--workdir={workdir}", "--mode=train", "--config.train.total_steps=2", env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    pred = _main(f"--workdir={workdir}", "--mode=predict", f"--images={images}/*.jpg",
                 f"--output={out}", env=env)
    assert pred.returncode == 0, pred.stderr[-3000:]

    detections = json.loads((out / "detections.json").read_text())
    text = json.dumps(detections)
    assert "im0.jpg" in text and "im1.jpg" in text
    drawn = sorted(p.name for p in out.iterdir() if p.suffix in (".jpg", ".png"))
    assert len(drawn) == 2
    with Image.open(out / drawn[0]) as im:
        assert im.size in ((60, 80), (90, 50))  # drawn on the original image, original size
