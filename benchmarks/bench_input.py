"""Input-pipeline throughput (images/s) of the training pipeline at 512 px.

Cases: the synthetic shapes set (generated on the fly at ``--source_size``) and a COCO-json folder
of JPEGs written once into ``--workdir`` (the same shapes images, encoded at quality 90). Uses
every core tf.data is given (run as ``taskset -c 0,1`` to pin 2 cores).

    .venv/bin/python benchmarks/bench_input.py --batches 30
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from PIL import Image

from effdet_jax.data.config import default_data_config
from effdet_jax.data.pipeline import make_train_pipeline
from effdet_jax.data.sources.shapes import generate_shapes_example
from effdet_jax.models.model_config import get_efficientdet_config


def write_coco_folder(root: str, num: int, size: int) -> tuple[str, str]:
    """``num`` shapes images as JPEGs plus ``instances.json`` (skipped if already there)."""
    img_dir = os.path.join(root, "images")
    ann = os.path.join(root, "instances.json")
    if os.path.exists(ann):
        return ann, img_dir
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i in range(num):
        image, boxes, classes = generate_shapes_example(7, i, size, 4, 2, 10)
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(os.path.join(img_dir, name), quality=90)
        images.append({"id": i, "file_name": name, "height": image.shape[0],
                       "width": image.shape[1]})
        for b, c in zip(boxes, classes, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                         "iscrowd": 0, "bbox": [float(b[1]), float(b[0]), float(b[3] - b[1]),
                                                float(b[2] - b[0])]})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(4)]
    with open(ann, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    return ann, img_dir


def measure(config, image_size: int, batch_size: int, batches: int) -> float:
    normalization = get_efficientdet_config("efficientdet-d0").normalization
    it = iter(make_train_pipeline(config, image_size, batch_size, normalization=normalization))
    for _ in range(3):  # warm-up: tracing, autotune, first prefetches
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--source_size", type=int, default=640, help="longest side of source images")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_input"))
    args = p.parse_args()
    rows = []
    base = default_data_config()
    base.shapes.image_size = args.source_size
    base.shapes.num_train = 400
    rows.append(("shapes (generated)", measure(base, args.image_size, args.batch_size,
                                               args.batches)))
    ann, img_dir = write_coco_folder(args.workdir, 400, args.source_size)
    c = default_data_config()
    c.source = "coco_json"
    c.train_annotations = c.eval_annotations = ann
    c.train_images = c.eval_images = img_dir
    rows.append(("COCO-json folder of JPEGs", measure(c, args.image_size, args.batch_size,
                                                      args.batches)))
    c.autoaugment_policy = "v0"
    rows.append(("COCO-json + AutoAugment v0", measure(c, args.image_size, args.batch_size,
                                                       args.batches)))
    print(f"cores: {len(os.sched_getaffinity(0))}, image_size {args.image_size}, source images "
          f"<= {args.source_size} px, batch {args.batch_size}, {args.batches} batches")
    print("| case | images/s |\n|---|---|")
    for name, ips in rows:
        print(f"| {name} | {ips:.1f} |")


if __name__ == "__main__":
    main()
