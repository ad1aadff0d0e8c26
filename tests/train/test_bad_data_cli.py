"""``main.py --mode=train_and_eval`` on a COCO-json folder (train and eval splits) holding every
kind of damage a real annotation export has: unreadable, missing and non-RGB files, a GIF named
.jpg, a 4000x3000 image, a json size that disagrees with its file, 150 boxes on one image, and
every kind of malformed box. The run trains, evaluates (an AP is logged) and exits 0;
``WORKDIR/data_report.json``, the log and the TensorBoard ``data/*`` scalars count each case
exactly once per meeting, and nothing without a case behind it. With ``on_bad_data=error`` the
same folder stops in seconds, naming the first bad file and annotation."""

import glob
import io
import json
import math
import subprocess
import time

import numpy as np
import pytest
from PIL import Image
from train_helpers import ROOT, main_command, subprocess_env

H, W = 48, 64  # height and width (pixels) of every image but big.png
CATEGORIES = [{"id": i, "name": n} for i, n in enumerate(("a", "b", "c", "d"), start=1)]
N_GOOD = 3  # clean images; with the 13 special ones, 16 per split: two batches of 8
MANY = 150  # boxes on many.jpg (max_instances_per_image is 100)


def _jpeg(rng, mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).convert(mode).save(
        out, "JPEG")
    return out.getvalue()


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _special_files(rng) -> list[tuple[str, bytes | None, tuple[int, int]]]:
    """(file name, content or None for a missing file, json (height, width)) of the special
    images, in json order."""
    rgb = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65535, (H, W), dtype=np.uint16))
    full = _jpeg(rng)
    return [
        ("truncated.jpg", full[: len(full) // 2], (H, W)),  # header opens, decoding fails
        ("empty.jpg", b"", (H, W)),
        ("missing.jpg", None, (H, W)),
        ("notimage.jpg", b"annotations exported by a tool\n", (H, W)),
        ("gray.png", _png(rgb.convert("L")), (H, W)),
        ("rgba.png", _png(rgb.convert("RGBA")), (H, W)),
        ("palette.png", _png(rgb.convert("P")), (H, W)),
        ("cmyk.jpg", _jpeg(rng, "CMYK"), (H, W)),
        ("gray16.png", _png(gray16), (H, W)),
        ("gif.jpg", _png(rgb.convert("P"), "GIF"), (H, W)),  # a GIF named .jpg
        ("big.png", _png(Image.new("RGB", (4000, 3000), (90, 120, 30))), (3000, 4000)),
        ("size.jpg", _jpeg(rng), (2 * H, 2 * W)),  # the json says 96x128, the file is 48x64
        ("many.jpg", _jpeg(rng), (H, W)),
    ]


# Ids of the cases' annotations (image ids: 1..N_GOOD clean images, then the special files).
NAN_IDS = [1, 2, 3, 4, 5]  # NaN, inf, a string, 3 numbers, no bbox
INVERTED, PARTLY_OUTSIDE, FULLY_OUTSIDE, ZERO_AREA = 6, 7, 8, 9
UNKNOWN_CATEGORY, CROWD, UNKNOWN_IMAGE, SIZE_BOX = 20, 21, 22, 23


def _split(folder) -> tuple[str, str]:
    """The image folder and json of one split; returns (json path, image folder). Boxes are
    xywh pixels."""
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    images, anns = [], []
    files = [(f"im{i}.jpg", _jpeg(rng), (H, W)) for i in range(N_GOOD)] + _special_files(rng)
    for i, (name, content, (h, w)) in enumerate(files):
        if content is not None:
            (images_dir / name).write_bytes(content)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        if name != "many.jpg":  # one clean box per image (big.png: in its own pixels)
            box = [1000, 500, 2000, 1500] if name == "big.png" else [8, 6, 30, 20]
            anns.append({"id": 100 + i, "image_id": i + 1, "category_id": 1 + i % 4,
                         "iscrowd": 0, "bbox": box, "area": box[2] * box[3]})
    many_id = len(files)
    for k in range(MANY):  # all inside the image, areas 4..12
        box = [k % 16 * 4, k // 16 * 4, 2 + k % 3, 2 + k % 2]
        anns.append({"id": 1000 + k, "image_id": many_id, "category_id": 1, "iscrowd": 0,
                     "bbox": box, "area": box[2] * box[3]})
    bad = [[math.nan, 1, 2, 3], [1, 1, math.inf, 3], ["x", 1, 2, 3], [1, 2, 3], None,
           [50, 40, -20, -10],  # negative width/height -> corners swapped
           [-5, 30, 20, 30],  # partly outside -> clipped
           [100, 10, 10, 10],  # fully outside: zero area after clipping -> dropped
           [5, 5, 0, 10]]  # zero width -> dropped
    for k, bbox in enumerate(bad):
        ann = {"id": 1 + k, "image_id": 1, "category_id": 2, "iscrowd": 0, "area": 1.0}
        if bbox is not None:
            ann["bbox"] = bbox
        anns.append(ann)
    size_id = 1 + next(i for i, f in enumerate(files) if f[0] == "size.jpg")
    anns += [
        {"id": UNKNOWN_CATEGORY, "image_id": 1, "category_id": 42, "iscrowd": 0,
         "bbox": [4, 4, 10, 10], "area": 100},
        {"id": CROWD, "image_id": 2, "category_id": 3, "iscrowd": 1, "bbox": [0, 0, 30, 30],
         "area": 900},
        {"id": UNKNOWN_IMAGE, "image_id": 999, "category_id": 1, "iscrowd": 0,
         "bbox": [0, 0, 10, 10], "area": 100},
        # inside the json's 96x128, outside the file's 48x64: clipped to the file
        {"id": SIZE_BOX, "image_id": size_id, "category_id": 1, "iscrowd": 0,
         "bbox": [40, 30, 40, 30], "area": 1200},
    ]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": CATEGORIES}))
    return str(path), str(images_dir)


# What the start-up scan finds in each split: counter -> (count, examples).
PROBLEMS = {
    "images_missing": (1, ["missing.jpg"]),
    "images_unreadable": (2, ["empty.jpg", "notimage.jpg"]),
    "images_size_mismatch": (1, ["size.jpg"]),
    "boxes_nan_dropped": (5, NAN_IDS),
    "boxes_unknown_class_dropped": (1, [UNKNOWN_CATEGORY]),
    "boxes_inverted_fixed": (1, [INVERTED]),
    "boxes_clipped": (2, [PARTLY_OUTSIDE, SIZE_BOX]),
    "boxes_degenerate_dropped": (2, [FULLY_OUTSIDE, ZERO_AREA]),
    "boxes_unknown_image_dropped": (1, [UNKNOWN_IMAGE]),
}
# The first 5 of the 6 converted files (gif.jpg is the sixth): a report shows up to 5 examples.
CONVERTED = ["gray.png", "rgba.png", "palette.png", "cmyk.jpg", "gray16.png"]
NOTES = {
    "train": {"images_converted": (6, CONVERTED), "boxes_crowd_dropped": (1, [CROWD]),
              "boxes_over_max_dropped": (MANY - 100, ["many.jpg"])},
    "eval": {"images_converted": (6, CONVERTED)},  # crowd kept, never capped
}
# What the pipeline meets in one pass over a split (the truncated file too); every other
# quality counter stays 0.
PIPELINE = {"images_unreadable": 4, "images_converted": 6, "boxes_nan_dropped": 5,
            "boxes_unknown_class_dropped": 1, "boxes_inverted_fixed": 1, "boxes_clipped": 2,
            "boxes_degenerate_dropped": 2, "images_without_objects": 0}
TRAIN_ONLY = {"boxes_crowd_dropped": 1, "boxes_over_max_dropped": MANY - 100}
NORMAL = ("boxes_cropped_out", "padding_examples")  # augmentation and padding, reported apart


def _folder(tmp_path, *overrides: str) -> list[str]:
    train_json, train_images = _split(tmp_path / "train")
    eval_json, eval_images = _split(tmp_path / "eval")
    cmd = main_command(
        tmp_path / "run",
        "--config.data.source=coco_json",
        f"--config.data.train_annotations={train_json}",
        f"--config.data.train_images={train_images}",
        f"--config.data.eval_annotations={eval_json}",
        f"--config.data.eval_images={eval_images}",
        # No scale jitter, so no box is cropped away and one epoch meets every box once.
        "--config.data.jitter_min=1.0", "--config.data.jitter_max=1.0",
        "--config.train.total_steps=2",
        "--config.eval.num_summary_images=0",
        *overrides,
    )
    cmd[cmd.index("--mode=train")] = "--mode=train_and_eval"
    return cmd


def _scalars(workdir) -> dict[str, dict[int, float]]:
    """TensorBoard scalars of ``workdir``'s event files: tag -> {step: value}."""
    import tensorflow as tf

    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(f"{workdir}/**/events.out.tfevents.*", recursive=True):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    v = float(tf.make_ndarray(value.tensor))
                elif value.HasField("simple_value"):
                    v = float(value.simple_value)
                else:  # images, hparams
                    continue
                out.setdefault(value.tag, {})[event.step] = v
    return out


def test_train_and_eval_survives_bad_data_and_counts_each_case(tmp_path):
    cmd = _folder(tmp_path)
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=900)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "evaluation at step 2:" in log and "\n  AP  " in log, log[-4000:]

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["source"] == "coco_json" and report["on_bad_data"] == "report"
    for split in ("train", "eval"):
        r = report["splits"][split]
        assert (r["images"], r["boxes"]) == (N_GOOD + 13, N_GOOD + 12 + MANY + 13), split
        got = {k: (v["count"], v["examples"]) for k, v in r["problems"].items()}
        assert got == PROBLEMS, split
        got = {k: (v["count"], v["examples"]) for k, v in r["notes"].items()}
        assert got == NOTES[split], split
        assert r["largest_image"] == {"file_name": "big.png", "height": 3000, "width": 4000}
        assert f"data report, {split} split" in log

    # Evaluation: the unreadable files are skipped and the ground truth is the json's, with the
    # rule applied at the files' own sizes (the box on size.jpg is clipped) and nothing capped.
    assert "eval data: 4 images skipped as unreadable" in log
    kept = N_GOOD + 12 + MANY + 13 - 5 - 1 - 2 - 1
    assert f"[{kept} of {N_GOOD + 12 + MANY + 13} ground-truth boxes kept" in log

    scalars = _scalars(tmp_path / "run")
    step = 2  # two batches of 8: one pass over the 16 training images
    train = {k[len("data/"):]: v[step] for k, v in scalars.items()
             if k.startswith("data/") and "/" not in k[len("data/"):]}
    for key, value in {**PIPELINE, **TRAIN_ONLY}.items():
        assert train.pop(key) == value, key
    assert set(train) <= set(NORMAL), train  # no other counter exists
    ev = {k[len("data/eval/"):]: v[step] for k, v in scalars.items() if k.startswith("data/eval/")}
    assert ev.pop("boxes_over_max_dropped") == MANY - 100  # eval batch rows only, see below
    assert ev.pop("padding_examples") == 0
    for key, value in PIPELINE.items():
        assert ev.pop(key) == value, key
    assert all(v == 0 for v in ev.values()), ev
    gt = {k[len("data/eval_gt/"):]: v[step] for k, v in scalars.items()
          if k.startswith("data/eval_gt/")}
    assert gt == {**{k: float(n) for k, (n, _) in PROBLEMS.items() if k.startswith("boxes_")},
                  "boxes_dropped": 9.0}


def test_on_bad_data_error_stops_in_seconds_naming_the_first_bad_entry(tmp_path):
    cmd = _folder(tmp_path, "--config.data.on_bad_data=error")
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=300)
    elapsed = time.monotonic() - start
    log = run.stdout + run.stderr
    assert run.returncode != 0, log[-3000:]
    assert "error: config.data.on_bad_data='error' and the train split" in log, log[-3000:]
    assert "first bad file: empty.jpg (images_unreadable" in log
    assert "first bad annotation: annotation id 1 of image_id 1" in log
    assert "boxes_nan_dropped" in log and "--config.data.on_bad_data=report" in log
    assert "Traceback" not in log
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before the model
    assert elapsed < 60, elapsed


@pytest.mark.parametrize("source", ["shapes", "tfds"])
def test_sources_without_files_say_what_is_reported(tmp_path, source):
    from configs import tiny
    from effdet_jax.data.report import report_data

    config = tiny.get_config().data
    config.source = source
    report_data(config, ("train", "eval"), str(tmp_path))
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["splits"] == {} and "nothing to scan" in report["note"]
