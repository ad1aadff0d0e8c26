"""Input-pipeline throughput (images/s) of the training pipeline, per number of CPU cores.

Data, written once into ``--workdir``: ``--num_images`` synthetic shapes images (textured, <=
``--source_size`` px) as JPEGs (quality 90) in a COCO-json folder, and the same JPEG bytes in a
local tfds dataset (``bench_coco_like``: TFRecords of encoded JPEGs with ``objects/{bbox,label,
is_crowd}`` and ``image/id``, the way tfds stores ``coco/2017``; no download).

Each case runs in its own process pinned to the first ``k`` cores (``os.sched_setaffinity``
before TensorFlow starts) with TF's inter/intra-op threads, the dataset's private thread pool
and ``num_parallel_calls`` set to ``k``: the training pipeline at ``--image_size`` with the COCO
recipe's augmentation (jitter 0.1-2.0, horizontal flip; ``+ AA v0`` adds AutoAugment v0).
Each cell is ``images/s (images per CPU-second)``: the second figure divides by the CPU time the
process used (user + system, all threads), so it is the rate of one fully used core even when
other jobs share the machine.
``COCO-json, PIL`` decodes every file with PIL inside ``tf.numpy_function`` (the route the
pipeline keeps for files TF cannot decode, and the only one before TF decoding); ``COCO-json,
TF`` is the default route; ``decode only`` rows decode the files and nothing else.

    .venv/bin/python benchmarks/bench_input.py --cores 1,2 --batches 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CASES = ("coco_pil", "coco_tf", "tfds", "coco_pil_aa", "coco_tf_aa", "tfds_aa",
         "coco_pil_decode", "coco_tf_decode")
CASE_NAMES = {
    "coco_pil": "COCO-json JPEG folder, PIL decode (before)",
    "coco_tf": "COCO-json JPEG folder, TF decode",
    "tfds": "tfds (TFRecords of JPEGs)",
    "coco_pil_aa": "COCO-json, PIL decode (before) + AA v0",
    "coco_tf_aa": "COCO-json, TF decode + AA v0",
    "tfds_aa": "tfds + AA v0",
    "coco_pil_decode": "COCO-json, PIL decode only (no augmentation)",
    "coco_tf_decode": "COCO-json, TF decode only (no augmentation)",
}
TFDS_NAME = "bench_coco_like"
NUM_CLASSES = 4


def _annotations(num: int, size: int):
    """(file name, image uint8, boxes yxyx pixels, classes 0-based) of the benchmark images."""
    from effdet_jax.data.sources.shapes import generate_shapes_example

    for i in range(num):
        image, boxes, classes = generate_shapes_example(7, i, size, NUM_CLASSES, 2, 10)
        yield f"{i:06d}.jpg", image, boxes, classes


def write_coco_folder(root: str, num: int, size: int) -> tuple[str, str]:
    """``num`` JPEGs plus ``instances.json`` under ``root`` (skipped if already there)."""
    from PIL import Image

    img_dir = os.path.join(root, "images")
    ann = os.path.join(root, "instances.json")
    if os.path.exists(ann):
        return ann, img_dir
    os.makedirs(img_dir, exist_ok=True)
    images, anns = [], []
    for i, (name, image, boxes, classes) in enumerate(_annotations(num, size)):
        Image.fromarray(image).save(os.path.join(img_dir, name), quality=90)
        images.append({"id": i, "file_name": name, "height": image.shape[0],
                       "width": image.shape[1]})
        for b, c in zip(boxes, classes, strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c) + 1,
                         "iscrowd": 0, "bbox": [float(b[1]), float(b[0]), float(b[3] - b[1]),
                                                float(b[2] - b[0])]})
    cats = [{"id": k + 1, "name": f"c{k}"} for k in range(NUM_CLASSES)]
    with open(ann + ".tmp", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    os.replace(ann + ".tmp", ann)
    return ann, img_dir


def _tfds_builder_class():
    """The local tfds builder: the COCO-json folder's JPEG files, stored as tfds stores COCO."""
    import numpy as np
    import tensorflow_datasets as tfds

    class BenchCocoLike(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = []

        def __init__(self, *, image_dir: str = "", **kwargs):
            self._image_dir = image_dir
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "image/id": np.int64,
                "objects": tfds.features.Sequence({
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                    "is_crowd": np.bool_,
                }),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            with open(os.path.join(self._image_dir, "..", "instances.json")) as f:
                data = json.load(f)
            per_image = {im["id"]: [] for im in data["images"]}
            for a in data["annotations"]:
                per_image[a["image_id"]].append(a)
            for im in data["images"]:
                h, w = im["height"], im["width"]
                objects = [{"bbox": tfds.features.BBox(a["bbox"][1] / h, a["bbox"][0] / w,
                                                       (a["bbox"][1] + a["bbox"][3]) / h,
                                                       (a["bbox"][0] + a["bbox"][2]) / w),
                            "label": a["category_id"] - 1, "is_crowd": False}
                           for a in per_image[im["id"]]]
                yield im["id"], {"image": os.path.join(self._image_dir, im["file_name"]),
                                 "image/id": im["id"], "objects": objects}

    BenchCocoLike.name = TFDS_NAME
    return BenchCocoLike


def write_tfds(data_dir: str, image_dir: str) -> None:
    """Prepares ``bench_coco_like`` in ``data_dir`` (skipped if already there)."""
    builder = _tfds_builder_class()(image_dir=image_dir, data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()


def _pin(cores: int) -> None:
    os.sched_setaffinity(0, range(cores))


def run_case(case: str, cores: int, args) -> dict:
    """One measurement in this process (already pinned to ``cores`` cores)."""
    import tensorflow as tf

    tf.config.threading.set_inter_op_parallelism_threads(cores)
    tf.config.threading.set_intra_op_parallelism_threads(cores)
    from effdet_jax.data import report
    from effdet_jax.data.config import default_data_config
    from effdet_jax.data.pipeline import make_train_pipeline
    from effdet_jax.models.model_config import get_efficientdet_config

    c = default_data_config()
    c.jitter_min, c.jitter_max, c.hflip = 0.1, 2.0, True  # configs/coco.py's recipe
    c.num_parallel_calls = cores
    c.autoaugment_policy = "v0" if case.endswith("_aa") else ""
    ann = os.path.join(args.workdir, "coco", "instances.json")
    img_dir = os.path.join(args.workdir, "coco", "images")
    if case.startswith("coco"):
        c.source = "coco_json"
        c.train_annotations = c.eval_annotations = ann
        c.train_images = c.eval_images = img_dir
        if case.startswith("coco_pil"):
            report.tf_decodable = lambda *_: False  # every file through PIL (the "before" route)
    else:
        _tfds_builder_class()  # registers the builder
        c.source = "tfds"
        c.tfds_name = TFDS_NAME
        c.tfds_data_dir = os.path.join(args.workdir, "tfds")
        c.train_split = "train"
    if case.endswith("_decode"):  # the source's decode alone, batched by image count
        from effdet_jax.data.sources import make_source

        source = make_source(c, "train", 0, 1)
        dataset = source.records.repeat().map(lambda r: source.decode(r)["image"],
                                              num_parallel_calls=cores, deterministic=True)
        dataset = dataset.map(tf.shape).batch(args.batch_size)
    else:
        normalization = get_efficientdet_config("efficientdet-d0").normalization
        dataset = make_train_pipeline(c, args.image_size, args.batch_size,
                                      normalization=normalization).dataset
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    it = dataset.with_options(options).as_numpy_iterator()
    for _ in range(3):  # warm-up: tracing, first prefetches
        next(it)
    load = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(it)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    images = args.batches * args.batch_size
    return {"case": case, "cores": cores, "cores_seen": len(os.sched_getaffinity(0)),
            "images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds,
            "load_before": load, "load_after": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=512)
    p.add_argument("--source_size", type=int, default=640, help="longest side of source images")
    p.add_argument("--num_images", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--cores", default="1,2", help="comma-separated core counts")
    p.add_argument("--cases", default=",".join(CASES), help=f"subset of {CASES}")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_input"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # "case:cores", internal
    args = p.parse_args()
    if args.worker:
        case, cores = args.worker.split(":")
        _pin(int(cores))
        print("RESULT " + json.dumps(run_case(case, int(cores), args)), flush=True)
        return

    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; known: {CASES}")
    core_counts = [int(k) for k in args.cores.split(",")]
    available = len(os.sched_getaffinity(0))
    if max(core_counts) > available:
        p.error(f"--cores {args.cores}: this process may use {available} cores")
    ann, img_dir = write_coco_folder(os.path.join(args.workdir, "coco"), args.num_images,
                                     args.source_size)
    if any(c.startswith("tfds") for c in cases):
        write_tfds(os.path.join(args.workdir, "tfds"), img_dir)
    sizes = [os.path.getsize(os.path.join(img_dir, f)) for f in os.listdir(img_dir)]
    rows = []
    for case in cases:
        for cores in core_counts:
            cmd = [sys.executable, os.path.abspath(__file__), f"--worker={case}:{cores}",
                   *(f"--{k}={getattr(args, k)}" for k in
                     ("image_size", "source_size", "num_images", "batch_size", "batches",
                      "workdir"))]
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
            if run.returncode != 0 or not lines:
                sys.exit(f"case {case} on {cores} cores failed:\n{run.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            if rows[-1]["cores_seen"] != cores:
                sys.exit(f"case {case}: pinned to {cores} cores, the worker saw "
                         f"{rows[-1]['cores_seen']}")
            print(f"{CASE_NAMES[case]}, {cores} core(s): {rows[-1]['images_per_s']:.1f} images/s",
                  file=sys.stderr, flush=True)
    print(f"image_size {args.image_size}, batch {args.batch_size}, {args.batches} timed batches, "
          f"{len(sizes)} JPEGs <= {args.source_size} px (mean {sum(sizes) / len(sizes) / 1e3:.0f} "
          f"kB), jitter 0.1-2.0 + flip, load average now {os.getloadavg()[0]:.1f}")
    header = "| case | " + " | ".join(f"{k} core{'s' * (k > 1)}: img/s (img/CPU-s)"
                                     for k in core_counts)
    print(header + " | load avg |\n|---|" + "---|" * (len(core_counts) + 1))
    for case in cases:
        got = {r["cores"]: r for r in rows if r["case"] == case}
        loads = [v for r in got.values() for v in (r["load_before"], r["load_after"])]
        print(f"| {CASE_NAMES[case]} | "
              + " | ".join(f"{got[k]['images_per_s']:.1f} ({got[k]['images_per_cpu_s']:.1f})"
                           for k in core_counts)
              + f" | {min(loads):.1f}-{max(loads):.1f} |")


if __name__ == "__main__":
    main()
