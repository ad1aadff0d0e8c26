import json

import numpy as np
from PIL import Image

from effdet_jax.models.model_config import LITE_NORMALIZATION
from effdet_jax.visualize import draw_detections, predict_images


def test_draw_respects_threshold():
    image = np.zeros((40, 60, 3), np.uint8)
    boxes = np.array([[5, 5, 30, 40], [10, 45, 20, 55]], np.float32)
    out = np.asarray(draw_detections(image, boxes, np.array([0.9, 0.2]), np.array([0, 1]),
                                     ["cat", "dog"]))
    assert out[30, 20].any()  # bottom edge of the kept box
    assert not out[15, 50].any() and not out[20, 50].any()  # the 0.2 box is not drawn


def test_predict_images_maps_back_and_writes_json(tmp_path):
    img = np.zeros((60, 120, 3), np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg")
    Image.fromarray(img[..., 0]).save(tmp_path / "b.png")  # grayscale is fine too
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    seen = []

    def detect_fn(images):
        seen.append(images.shape)
        # The black images arrive normalised as given: (0 - 127) / 128 for a lite model.
        np.testing.assert_allclose(images[0, :30, :, :], -127.0 / 128.0)
        b = images.shape[0]
        boxes = np.tile(np.array([[[8.0, 16.0, 24.0, 48.0]]], np.float32), (b, 2, 1))
        return boxes, np.tile([[0.9, 0.1]], (b, 1)), np.zeros((b, 2), np.int32), np.full(b, 2)

    paths = [str(tmp_path / n) for n in ("a.jpg", "bad.jpg", "b.png")]
    out = tmp_path / "out"
    records = predict_images(paths, detect_fn, 64, ["thing"], str(out), batch_size=2,
                             normalization=LITE_NORMALIZATION)
    assert seen == [(2, 64, 64, 3)]
    saved = json.loads((out / "detections.json").read_text())
    assert saved == records
    by_file = {r["file"]: r for r in saved}
    assert "error" in by_file[paths[1]] and "bad.jpg" in by_file[paths[1]]["error"]
    det = by_file[paths[0]]["detections"]
    assert len(det) == 2 and det[0]["class_name"] == "thing"
    # 120x60 -> 64x32: image_scale = 120/64 = 1.875.
    np.testing.assert_allclose(det[0]["box_yxyx"], [15.0, 30.0, 45.0, 90.0], atol=0.01)
    assert (out / "a.png").exists() and (out / "b.png").exists()
