"""COCO AP of exported files on a trained workdir's eval set, next to the JAX model on the same
uint8 images, and each file's raw-output difference from JAX (max over outputs of
``max |file - jax| / max |jax|``).

Every file must hold the raw outputs (``--config.export.with_nms=false``); the same JAX
post-processing (``config.eval.postprocess``) turns each runtime's raw outputs into detections, so
the AP differences come from the network's numerics (float16 / int8 LiteRT) only. Images: the
eval pipeline's letterboxed images, de-normalised and rounded to uint8 pixels.

    python benchmarks/export_accuracy.py --config=configs/shapes.py --workdir=DIR \
        --files=tflite:OUT32/model.tflite,tflite:OUT16/model.tflite,tflite:OUT8/model.tflite
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from effdet_jax import evaluation
from effdet_jax.data.transforms import denormalize_image
from effdet_jax.detection import anchors
from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.export import formats, parity, serving
from effdet_jax.train import batches, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the config files import configs/
config_flags.DEFINE_config_file("config", None, "Training config of the workdir.", lock_config=True)
flags.DEFINE_string("workdir", None, "Trained workdir (its latest checkpoint, EMA weights).")
flags.DEFINE_list("files", [], "FORMAT:PATH of each exported file (raw outputs, batch 1).")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    config = FLAGS.config
    exp, variables = trainer.inference_variables(config, FLAGS.workdir)
    variables = jax.device_get(variables)
    model = exp.model
    names = serving.output_names(model, with_nms=False)
    jax_fn = jax.jit(serving.make_serving_fn(model, variables, None))
    pp = PostprocessConfig(**config.eval.postprocess.to_dict())
    anchor_boxes = jnp.asarray(anchors.generate_anchors(serving.plain_model(model).config.anchor_config()))
    size = serving.image_size(model)
    n_cls = len(names) // 2

    @jax.jit
    def detect(raw):
        det = postprocess(list(raw[:n_cls]), list(raw[n_cls:]), anchor_boxes, size, None, pp)
        return tuple(det[k] for k in serving.NMS_OUTPUTS)

    runtimes = {"jax": None} | {f: f for f in FLAGS.files}
    pipeline = batches.eval_pipeline(config, exp.image_size)
    evaluators = {k: evaluation.CocoEvaluator(pipeline.label_map, pipeline.gt_annotations)
                  for k in runtimes}
    worst = {k: 0.0 for k in runtimes}
    for batch in pipeline:
        real = np.asarray(batch["image_id"]) >= 0
        batch = {k: np.asarray(v)[real] for k, v in batch.items() if k != "counts"}
        if not len(batch["image_id"]):
            continue
        images = np.clip(np.round(denormalize_image(batch["images"], pipeline.normalization)),
                         0, 255).astype(np.uint8)
        reference = [np.asarray(x) for x in jax_fn(images)]
        for key, spec in runtimes.items():
            if spec is None:
                raw = reference
            else:
                fmt, path = spec.split(":", 1)
                if fmt == "tflite":  # one LiteRT process per eval batch, one image at a time inside
                    raw = formats.run(fmt, path, images, names)
                else:  # the files take batch 1: one image at a time
                    rows = [formats.run(fmt, path, images[i:i + 1], names) for i in range(len(images))]
                    raw = [np.concatenate([r[j] for r in rows]) for j in range(len(names))]
                worst[key] = max(worst[key], parity.raw_relative_error(reference, raw))
            evaluators[key].add_batch(batch, tuple(np.asarray(d) for d in detect(tuple(raw))))
    results = {}
    for key, ev in evaluators.items():
        metrics = ev.evaluate()
        results[key] = {"AP": metrics["AP"], "AP50": metrics["AP50"], "raw_relative": worst[key]}
        print(f"| {key} | {metrics['AP']:.4f} | {metrics['AP50']:.4f} | {worst[key]:.2e} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
