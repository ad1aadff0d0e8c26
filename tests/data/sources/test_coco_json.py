"""COCO-json folders, including every kind of bad data."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from effdet_jax.data.pipeline import make_eval_pipeline, make_train_pipeline
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

from ..helpers import take, tiny_shapes_config

S = 64


def _write_folder(tmp_path):
    """A folder with 8 images covering each bad-data case; returns (json path, image dir)."""
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")  # grayscale
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 200, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")  # CMYK JPEG
    Image.fromarray(rgb).save(d / "empty.jpg")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    Image.fromarray(rgb).save(d / "crowd.jpg")
    files = ["rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "empty.jpg", "broken.jpg",
             "missing.jpg", "crowd.jpg"]
    images = [{"id": 100 + i, "file_name": f, "height": 40, "width": 60}
              for i, f in enumerate(files)]
    nan = float("nan")
    anns = [
        (100, [6, 4, 30, 20], 3, 0),     # good: x=6, y=4, w=30, h=20
        (100, [nan, 4, 10, 10], 3, 0),   # NaN -> dropped
        (100, [50, 30, -20, -10], 9, 0),  # negative w/h = inverted -> fixed
        (101, [-5, -5, 20, 20], 9, 0),   # out of range -> clipped
        (101, [10, 10, 0, 5], 3, 0),     # zero width -> dropped
        (102, [1, 1, 5, 5], 42, 0),      # unknown category -> dropped
        (102, [2, 2, 20, 20], 9, 0),
        (103, [2, 2, 20, 20], 3, 0),
        (103, "oops", 3, 0),             # malformed bbox -> NaN -> dropped
        (105, [2, 2, 20, 20], 3, 0),     # on the unreadable image
        (107, [0, 0, 60, 40], 3, 1),     # crowd
        (107, [5, 5, 10, 10], 9, 0),
    ]  # fmt: skip
    annotations = [{"id": i + 1, "image_id": im, "bbox": bb, "category_id": cat, "iscrowd": cr,
                    "area": 1.0} for i, (im, bb, cat, cr) in enumerate(anns)]
    categories = [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}, allow_nan=True))
    return str(path), str(d)


def _config(ann, img):
    c = tiny_shapes_config(source="coco_json")
    c.train_annotations = c.eval_annotations = ann
    c.train_images = c.eval_images = img
    return c


def test_eval_handles_every_bad_case_with_counts_and_messages(tmp_path, caplog):
    c = _config(*_write_folder(tmp_path))
    with caplog.at_level(logging.WARNING):
        p = make_eval_pipeline(c, S, 8, normalization=IMAGENET)
        (batch,) = list(p)
    assert p.label_map.category_ids == (3, 9) and p.label_map.names == ("three", "nine")
    counts = batch["counts"]
    assert counts["images_unreadable"] == 2  # broken.jpg and missing.jpg
    assert counts["images_converted"] == 3  # gray, rgba, cmyk
    assert counts["boxes_nan_dropped"] == 2
    assert counts["boxes_inverted_fixed"] == 1
    assert counts["boxes_clipped"] == 1
    assert counts["boxes_degenerate_dropped"] == 1
    assert counts["boxes_unknown_class_dropped"] == 1
    # empty.jpg and the two unreadable files have no objects; only readable ones are counted.
    assert counts["images_without_objects"] == 1
    text = caplog.text
    assert "broken.jpg" in text and "missing.jpg" in text and "replaced by an empty one" in text
    # Unreadable eval images are skipped (image_id -1); the others keep their COCO ids.
    np.testing.assert_array_equal(batch["image_id"], [100, 101, 102, 103, 104, -1, -1, 107])

    scale = batch["image_scale"]
    np.testing.assert_allclose(scale[batch["image_id"] >= 0], 60 / S, rtol=1e-6)
    good = batch["boxes"][0][batch["classes"][0] >= 0] * scale[0]
    # rgb.jpg: [6,4,30,20] xywh -> yxyx [4,6,24,36]; the inverted one -> [20,30,30,50].
    np.testing.assert_allclose(sorted(good.tolist()), [[4, 6, 24, 36], [20, 30, 30, 50]],
                               atol=scale[0])
    assert sorted(batch["classes"][0][batch["classes"][0] >= 0].tolist()) == [0, 1]
    clipped = batch["boxes"][1][0] * scale[1]
    np.testing.assert_allclose(clipped, [0, 0, 15, 15], atol=scale[1])
    # The crowd box is kept for eval as -2 with its class in crowd_classes.
    crowd_rows = batch["classes"][7] == -2
    assert crowd_rows.sum() == 1 and batch["crowd_classes"][7][crowd_rows][0] == 0
    # Converted images really are RGB of the right size (grayscale -> 3 equal channels).
    gray = batch["images"][1][:42]  # rows below are padding
    assert np.allclose(gray[..., 0] * 0.229 + 0.485, gray[..., 1] * 0.224 + 0.456, atol=1e-5)


def test_training_replaces_unreadable_and_drops_crowd(tmp_path):
    c = _config(*_write_folder(tmp_path))
    c.jitter_min = c.jitter_max = 1.0
    batches = take(make_train_pipeline(c, S, 8, normalization=IMAGENET), 1)
    counts = batches[0]["counts"]
    assert counts["images_unreadable"] == 2 and counts["boxes_crowd_dropped"] == 1
    assert (batches[0]["classes"] != -2).all()
    c.skip_crowd_during_training = False
    batch = take(make_train_pipeline(c, S, 8, normalization=IMAGENET), 1)[0]
    assert (batch["classes"] == -2).sum() == 1 and batch["counts"]["boxes_crowd_dropped"] == 0


def test_bad_json_fails_with_the_file_name(tmp_path):
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    c = _config(str(bad), str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot read COCO annotations .*instances.json"):
        make_eval_pipeline(c, S, 2, normalization=IMAGENET)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="has no 'images' list"):
        make_eval_pipeline(c, S, 2, normalization=IMAGENET)


def test_on_bad_data_error_stops_at_a_file_that_fails_to_decode(tmp_path):
    c = _config(*_write_folder(tmp_path))
    c.on_bad_data = "error"
    with pytest.raises(Exception, match=r"cannot (decode|read) image .*(broken|missing)\.jpg"):
        list(make_eval_pipeline(c, S, 8, normalization=IMAGENET))
