"""PyTorch side of the benchmarks (timm / effdet), run with the torch venv, one case per process.

A case is the same JSON dict as ``jax_side.py`` with a torch model name: ``tf_efficientnet_b0``
(timm) or ``tf_efficientdet_d0`` / ``tf_efficientdet_d1`` (effdet, ``pretrained=False,
pretrained_backbone=False``), ``mode`` ``infer`` / ``e2e`` (``DetBenchPredict``: network +
effdet's post-processing) / ``train`` (timm: cross-entropy; effdet: ``DetBenchTrain``, whose
forward labels the anchors and computes the focal + box loss), ``batch``, ``image_size`` and
``channels_last`` (bool). The train step is forward, loss, backward and
``torch.optim.SGD(momentum=0.9, weight_decay=4e-5)``; inference runs under ``torch.inference_mode``.

    $TORCH_VENV/bin/python benchmarks/torch_side.py --case '{"model": "tf_efficientdet_d0",
        "mode": "train", "batch": 4, "image_size": 512}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import after_first_call, emit, max_rss_mb, pin_threads, steady_peak_rss, timed  # noqa: E402

NUM_GT = 8  # same synthetic ground truth as jax_side.py
MAX_INSTANCES = 100


def synthetic_target(batch: int, image_size: int, num_classes: int, seed: int = 0):
    """effdet's target dict: ``bbox`` [B, 100, 4] yxyx pixels, ``cls`` [B, 100] 1-based, -1 pad."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    boxes = np.full((batch, MAX_INSTANCES, 4), -1.0, np.float32)
    classes = np.full((batch, MAX_INSTANCES), -1, np.int64)
    yx = rng.uniform(0, 0.7 * image_size, (batch, NUM_GT, 2))
    hw = rng.uniform(0.05 * image_size, 0.3 * image_size, (batch, NUM_GT, 2))
    boxes[:, :NUM_GT, :2] = yx
    boxes[:, :NUM_GT, 2:] = np.minimum(yx + hw, image_size)
    classes[:, :NUM_GT] = rng.integers(0, num_classes, (batch, NUM_GT)) + 1
    return {
        "bbox": torch.from_numpy(boxes),
        "cls": torch.from_numpy(classes),
        "img_scale": torch.ones(batch),
        "img_size": torch.full((batch, 2), float(image_size)),
    }


def build(case: dict):
    import torch

    name, mode, size = case["model"], case["mode"], case["image_size"]
    if name.startswith("tf_efficientdet"):
        from effdet import create_model

        task = {"train": "train", "e2e": "predict"}.get(mode, "")
        # bench_labeler: DetBenchTrain assigns anchor targets inside forward, as our step does.
        model = create_model(
            name, bench_task=task, pretrained=False, pretrained_backbone=False,
            image_size=(size, size), bench_labeler=(mode == "train"),
        )
    else:
        import timm

        model = timm.create_model(name, pretrained=False)
    if case.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def run(case: dict) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    name, mode, batch, size = case["model"], case["mode"], case["batch"], case["image_size"]
    warmup, repeats = case.get("warmup", 2), case.get("repeats", 5)
    model = build(case)
    fmt = torch.channels_last if case.get("channels_last") else torch.contiguous_format
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    is_det = name.startswith("tf_efficientdet")

    if mode == "train":
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)
        if is_det:
            target = synthetic_target(batch, size, model.num_classes)

            def loss_fn():
                return model(images, target)["loss"]
        else:
            labels = torch.randint(0, 1000, (batch,))

            def loss_fn():
                return torch.nn.functional.cross_entropy(model(images), labels)

        def fn():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            opt.step()
    else:
        model.eval()

        def fn():
            with torch.inference_mode():
                model(images)

    t0 = time.perf_counter()
    fn()
    first_s = time.perf_counter() - t0
    memory_setup = after_first_call(case)
    stats = timed(fn, warmup, repeats)
    peak_mb = steady_peak_rss(fn)
    return {
        **case,
        "side": "torch",
        **stats,
        "images_per_s": batch / (stats["median_ms"] / 1e3),
        "first_call_s": round(first_s, 1),
        "peak_rss_steady_mb": round(peak_mb),
        **memory_setup,
        "max_rss_mb": round(max_rss_mb()),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", required=True, help="JSON case dict")
    args = parser.parse_args()
    pin_threads(int(os.environ.get("BENCH_THREADS", "2")))
    emit(run(json.loads(args.case)))


if __name__ == "__main__":
    main()
