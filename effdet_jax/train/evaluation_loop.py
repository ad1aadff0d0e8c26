"""One pass over the eval split: detections on device, COCO metrics on the host.

Every process runs the jitted ``detect`` on its shard of each global batch; the detections and the
batch's ground-truth fields are gathered to every process, which all compute the same metrics
(COCO AP does not decompose over shards). Only process 0's writer actually writes.
"""

import itertools
import logging as pylogging

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from effdet_jax import evaluation, visualize
from effdet_jax.data.transforms import Normalization, denormalize_image
from effdet_jax.train import input_pipeline
from effdet_jax.train.experiment import Experiment, host_batch_to_global

# Fields of an eval batch the evaluator needs, besides the detections.
_GT_KEYS = ("image_id", "image_scale", "boxes", "classes", "crowd_classes")


def _gather(tree):
    """Per-process numpy rows (or batch-sharded global arrays) -> all rows on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def evaluate(exp: Experiment, state, writer, step: int) -> dict[str, float]:
    """COCO metrics of ``state`` (EMA weights by default) on ``config.eval``'s split.

    Writes ``eval/<metric>`` scalars and ``eval/detections`` images at ``step``.
    """
    config = exp.config
    pipeline = input_pipeline.eval_pipeline(config, exp.image_size)
    evaluator = evaluation.CocoEvaluator(pipeline.label_map, pipeline.gt_annotations)
    variables = exp.eval_variables(state)
    num_batches = pipeline.num_batches
    if config.eval.num_images is not None:
        num_batches = min(num_batches, -(-config.eval.num_images // config.eval.batch_size))
    summary_images = None
    for host_batch in itertools.islice(iter(pipeline), num_batches):
        images = host_batch_to_global(host_batch, exp.batch_sharding, ("images",))["images"]
        detections = _gather(exp.detect(variables, images))
        gt = _gather({k: host_batch[k] for k in _GT_KEYS if k in host_batch})
        dets = tuple(detections[k] for k in ("boxes", "scores", "classes", "valid"))
        evaluator.add_batch(gt, dets)
        if summary_images is None and config.eval.num_summary_images > 0:
            n = config.eval.num_summary_images
            summary_images = _draw(host_batch["images"][:n], detections, pipeline.label_map.names,
                                   pipeline.normalization)
    pylogging.getLogger("effdet_jax.evaluation").setLevel(pylogging.WARNING)
    metrics = evaluator.evaluate()
    logging.info("eval at step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if summary_images is not None:
        writer.write_images(step, {"eval/detections": summary_images})
    return metrics


def _draw(images: np.ndarray, detections: dict, class_names, normalization: Normalization,
          threshold: float = 0.3) -> np.ndarray:
    """[N, S, S, 3] uint8 network-input images with their detections drawn, for TensorBoard;
    ``normalization`` is the pipeline's, so the images are de-normalised with what made them."""
    rgb = np.clip(denormalize_image(np.asarray(images), normalization), 0, 255)
    drawn = [
        np.asarray(
            visualize.draw_detections(
                rgb[i].astype(np.uint8),
                detections["boxes"][i],
                detections["scores"][i],
                detections["classes"][i],
                class_names,
                score_threshold=threshold,
            )
        )
        for i in range(len(images))
    ]
    return np.stack(drawn)
