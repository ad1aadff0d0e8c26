"""Fine-tune from a checkpoint of a 90-class model on a 3-class COCO-json folder with a frozen
backbone, through ``main.py`` as a user runs it, then predict with the result.

The checkpoint is an automl-named ``.npz`` of a thin 90-class D0 (``configs/tiny.py``'s
architecture) with random weights and random BN statistics. Checked: the backbone parameters, BN
statistics (``freeze_bn``) and their EMA copies are bit-exact after training, frozen parameters
have no optimizer state, the L2 term leaves the frozen kernels out, the heads changed, the class
head has 3 x 9 outputs, the logged table lists the class head as re-initialised, and predict, in
a new workdir with only ``init.checkpoint=RUN:2``, writes the folder's class names.
"""

import json
import re
import subprocess
import sys

import jax
import numpy as np
from flax import traverse_util
from init_helpers import automl_named, write_coco_folder
from train_helpers import ROOT, restore_state, subprocess_env, tiny_config

from effdet_jax.convert.automl import convert_automl_arrays
from effdet_jax.train.experiment import build_model

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "bird"}]
SIZE = 64


def _checkpoint_90(path):
    """A thin 90-class D0 with random weights and BN statistics as automl-named npz; returns
    the model and the variables the loader must produce from it."""
    config = tiny_config()
    config.model.num_classes = 90
    model = build_model(config.model)
    variables = jax.jit(lambda key: model.init(key, np.zeros((1, SIZE, SIZE, 3), np.float32)))(
        jax.random.key(7))
    rng = np.random.default_rng(0)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, v: rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        if p[-1].key == "var" else rng.normal(0, 0.2, v.shape).astype(np.float32),
        variables["batch_stats"])
    params = jax.device_get(variables["params"])
    # Backbone kernels x10 (BN follows each conv, so training is unaffected): an L2 term that
    # counted the frozen backbone would be far above the one of the trained parameters.
    params["backbone"] = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 10 if p[-1].key == "kernel" else v, params["backbone"])
    variables = {"params": params, "batch_stats": stats}
    np.savez(path, **automl_named(variables, model))
    return model, variables


def _folder(root):
    rng = np.random.default_rng(1)
    images, boxes, ids = [], [], []
    for i in range(8):
        image = rng.integers(0, 60, (SIZE, SIZE, 3), dtype=np.uint8)
        y0, x0 = rng.integers(2, 30, 2)
        h, w = rng.integers(12, 30, 2)
        image[y0:y0 + h, x0:x0 + w] = 220
        images.append(image)
        boxes.append(np.array([[y0, x0, y0 + h, x0 + w]], np.float64))
        ids.append(np.array([CATEGORIES[i % 3]["id"]]))
    return write_coco_folder(root, images, boxes, CATEGORIES, ids)


def _flags(annotations, images, checkpoint):
    data = [f"--config.data.{split}_{what}={path}" for split in ("train", "eval")
            for what, path in (("annotations", annotations), ("images", images))]
    return ["--config.data.source=coco_json", *data, "--config.model.num_classes=3",
            f"--config.init.checkpoint={checkpoint}", "--config.train.freeze=^backbone/",
            "--config.train.freeze_bn=True"]


def _run(workdir, mode, *flags):
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={ROOT / 'configs/tiny.py'}",
           f"--workdir={workdir}", f"--mode={mode}", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=900)


def test_finetune_new_classes_frozen_backbone_then_predict(tmp_path):
    model90, source = _checkpoint_90(tmp_path / "tiny90.npz")
    annotations, images = _folder(tmp_path / "data")
    flags = _flags(annotations, images, tmp_path / "tiny90.npz")
    workdir = tmp_path / "run"

    train = _run(workdir, "train", *flags, "--config.train.total_steps=2",
                 "--config.checkpoint.every_steps=2")
    assert train.returncode == 0, train.stderr[-4000:]
    log = train.stderr + (workdir / "log.txt").read_text()  # the console and the full log
    assert re.search(r"re-initialised\s+params/class_net/predict/bias\s+\(27,\)", log), log[-4000:]
    assert re.search(r"re-initialised\s+params/class_net/predict/pointwise/kernel", log)
    assert re.search(r"loaded\s+params/backbone/stem_conv/kernel", log)
    trained = re.search(r"training ([\d,]+) of ([\d,]+) parameters \(([\d,]+) frozen", log)
    assert trained, log[-4000:]

    # The L2 term of step 1 (on the step-0 weights) covers the trained kernels only: at least
    # those loaded from the file (all but the new class kernel), far below the backbone's.
    reg = float(re.search(r"\[1\] .*train/reg_l2_loss=([-+.e0-9]+)", log)[1])
    flat = traverse_util.flatten_dict(source["params"])
    kernels = [p for p in flat if p[-1] == "kernel"]

    def l2(paths):
        return 4e-5 * 0.5 * sum(float(np.sum(np.square(flat[p].astype(np.float64)))) for p in paths)

    new_class_kernel = ("class_net", "predict", "pointwise", "kernel")
    loaded_trained = l2([p for p in kernels if p[0] != "backbone" and p != new_class_kernel])
    backbone = l2([p for p in kernels if p[0] == "backbone"])
    assert loaded_trained * (1 - 1e-5) <= reg <= loaded_trained + 0.01 * backbone, (
        reg, loaded_trained, backbone)

    config = tiny_config(total_steps=2, freeze="^backbone/", freeze_bn=True)
    config.model.num_classes = 3
    state = restore_state(config, workdir, 2)
    expected = traverse_util.flatten_dict(
        convert_automl_arrays(dict(np.load(tmp_path / "tiny90.npz")), model90, "tf1"))
    # The loader's conversion of the file is the model's own variables (round trip).
    assert all(np.array_equal(expected[p], v) for p, v in traverse_util.flatten_dict(
        {"params": source["params"], "batch_stats": source["batch_stats"]}).items())
    got = {**traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats}),
           **{("ema", *p): v for p, v in traverse_util.flatten_dict(
               {"params": state.ema_params, "batch_stats": state.ema_batch_stats}).items()}}
    backbone = [p for p in got if "backbone" in p]
    assert len(backbone) > 100
    for path in backbone:
        original = expected[path[1:] if path[0] == "ema" else path]
        assert np.array_equal(got[path], original), "/".join(path)
    changed = [p for p in got if p[:2] == ("params", "box_net") and not np.array_equal(
        got[p], expected[p])]
    assert changed, "the box head did not train"
    assert state.params["class_net"]["predict"]["pointwise"]["kernel"].shape[-1] == 3 * 9
    # Frozen parameters have no optimizer state: the momentum buffers cover the trained ones.
    momentum = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    assert momentum == int(trained[1].replace(",", ""))
    total = sum(x.size for x in jax.tree.leaves(state.params))
    assert int(trained[2].replace(",", "")) == total

    # Predict in a new workdir with only init.checkpoint, naming the run's step 2.
    out = tmp_path / "predicted"
    predict = _run(tmp_path / "predict_run", "predict", *flags[:-3],
                   f"--config.init.checkpoint={workdir}:2", f"--images={images}/im0.png",
                   f"--output={out}")
    assert predict.returncode == 0, predict.stderr[-4000:]
    records = json.loads((out / "detections.json").read_text())
    names = {d["class_name"] for r in records for d in r["detections"]}
    assert names and names <= {"cat", "dog", "bird"}, names
