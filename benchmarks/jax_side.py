"""JAX side of the benchmarks: builds the measured functions and runs one case per process.

A case is a JSON dict: ``model`` (``efficientnet-b0`` or ``efficientdet-d0``/``d1``...), ``mode``
(``infer``: network only; ``e2e``: network + post-processing, EfficientDet only; ``train``: one
full training step), ``batch``, ``image_size``, optional ``warmup`` / ``repeats``, ``overrides``
(model config fields, e.g. ``{"cpu_kernels": "off"}``) and ``num_classes`` (EfficientDet; 90).

The train step is what a real one does: forward in train mode, on-device target assignment
(``assign_targets``) and the automl loss (``detection_loss`` with L2) for EfficientDet or softmax
cross-entropy for EfficientNet, backward, the batch-norm statistics update, and an
``optax.sgd(momentum=0.9)`` update; the state is donated as in a trainer.

    .venv/bin/python benchmarks/jax_side.py --case '{"model": "efficientdet-d0", "mode": "train",
        "batch": 4, "image_size": 512}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import after_first_call, emit, max_rss_mb, pin_threads, steady_peak_rss, timed  # noqa: E402

# Ground truth per image in the synthetic batch (real rows; the rest is padding).
NUM_GT = 8
MAX_INSTANCES = 100


def synthetic_gt(batch: int, image_size: int, num_classes: int, seed: int = 0):
    """``[B, MAX_INSTANCES, 4]`` yxyx pixel boxes and ``[B, MAX_INSTANCES]`` 0-based classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    boxes = np.full((batch, MAX_INSTANCES, 4), -1.0, np.float32)
    classes = np.full((batch, MAX_INSTANCES), -1, np.int32)
    yx = rng.uniform(0, 0.7 * image_size, (batch, NUM_GT, 2))
    hw = rng.uniform(0.05 * image_size, 0.3 * image_size, (batch, NUM_GT, 2))
    boxes[:, :NUM_GT, :2] = yx
    boxes[:, :NUM_GT, 2:] = np.minimum(yx + hw, image_size)
    classes[:, :NUM_GT] = rng.integers(0, num_classes, (batch, NUM_GT))
    return boxes, classes


def build_efficientdet(name: str, image_size: int, overrides: dict, num_classes: int = 90):
    """Model, anchors ``[A, 4]`` and num_classes for an EfficientDet case."""
    import jax.numpy as jnp

    from effdet_jax import efficientdet
    from effdet_jax.detection.anchors import generate_anchors

    model = efficientdet(name, num_classes=num_classes, image_size=image_size, **overrides)
    anchors = jnp.asarray(generate_anchors(model.config.anchor_config()))
    return model, anchors, model.config.num_classes


def make_detection_train_step(
    model, anchors, num_classes: int, learning_rate: float = 0.01, train_bn: bool = True
):
    """``(step, init_state)``: ``step(state, images, boxes, classes) -> (state, loss)``.

    ``state`` is ``(params, batch_stats, opt_state)``. Not jitted: callers choose shardings.
    ``train_bn=False`` runs BN on its running statistics (only ``bench_scaling`` uses it, to
    count the communication train-mode BN adds).
    """
    import jax
    import optax

    from effdet_jax.detection.losses import detection_loss
    from effdet_jax.detection.targets import assign_targets

    tx = optax.sgd(learning_rate, momentum=0.9)

    def loss_fn(params, batch_stats, images, boxes, classes):
        (cls_out, box_out), mutated = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=train_bn,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)},
        )
        targets = assign_targets(boxes, classes, anchors, num_classes)
        loss, _ = detection_loss(cls_out, box_out, targets, anchors, params=params)
        return loss, mutated.get("batch_stats", batch_stats)

    def step(state, images, boxes, classes):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, boxes, classes
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, batch_stats, opt_state), loss

    def init_state(variables):
        return (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    return step, init_state


def make_classifier_train_step(model, learning_rate: float = 0.01):
    """EfficientNet: softmax cross-entropy on integer labels; same state layout as above."""
    import jax
    import optax

    tx = optax.sgd(learning_rate, momentum=0.9)

    def loss_fn(params, batch_stats, images, labels):
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)},
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, mutated["batch_stats"]

    def step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def init_state(variables):
        return (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    return step, init_state


def run(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from effdet_jax import efficientnet
    from effdet_jax.detection.postprocess import postprocess

    name, mode, batch, size = case["model"], case["mode"], case["batch"], case["image_size"]
    warmup, repeats = case.get("warmup", 2), case.get("repeats", 5)
    overrides = dict(case.get("overrides", {}))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))
    is_det = name.startswith("efficientdet")
    if is_det:
        model, anchors, num_classes = build_efficientdet(name, size, overrides,
                                                         case.get("num_classes", 90))
    else:
        model, num_classes = efficientnet(name, **overrides), 1000
    from effdet_jax.train.experiment import INIT_COMPILER_OPTIONS  # -O0: init runs once

    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False),
                        compiler_options=INIT_COMPILER_OPTIONS)(images[:1])

    t0 = time.perf_counter()
    if mode == "train":
        if is_det:
            step, init_state = make_detection_train_step(model, anchors, num_classes)
            boxes, classes = synthetic_gt(batch, size, num_classes)
            args = (jnp.asarray(boxes), jnp.asarray(classes))
        else:
            step, init_state = make_classifier_train_step(model)
            args = (jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32),)
        jstep = jax.jit(step, donate_argnums=0)
        holder = {"state": init_state(variables)}
        compiled = jstep.lower(holder["state"], images, *args).compile()

        def fn():
            holder["state"], loss = compiled(holder["state"], images, *args)
            loss.block_until_ready()
    else:
        if mode == "e2e":
            if not is_det:
                raise ValueError("e2e is for EfficientDet")

            def infer(v, x):
                cls_out, box_out = model.apply(v, x, train=False)
                return postprocess(cls_out, box_out, anchors, model.config.image_size)
        else:
            def infer(v, x):
                return model.apply(v, x, train=False)
        compiled = jax.jit(infer).lower(variables, images).compile()

        def fn():
            jax.block_until_ready(compiled(variables, images))
    compile_s = time.perf_counter() - t0
    fn()  # first call outside the sampled region (buffer allocation)
    memory_setup = after_first_call(case)
    stats = timed(fn, warmup, repeats)
    peak_mb = steady_peak_rss(fn)
    mem = compiled.memory_analysis()
    result = {
        **case,
        "side": "jax",
        **stats,
        "images_per_s": batch / (stats["median_ms"] / 1e3),
        "compile_s": round(compile_s, 1),
        "peak_rss_steady_mb": round(peak_mb),
        **memory_setup,
        "max_rss_mb": round(max_rss_mb()),
    }
    if mem is not None:
        result["xla_temp_mb"] = round(mem.temp_size_in_bytes / 2**20)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, help="JSON case dict")
    args = parser.parse_args()
    pin_threads(int(os.environ.get("BENCH_THREADS", "2")))
    emit(run(json.loads(args.case)))


if __name__ == "__main__":
    main()
