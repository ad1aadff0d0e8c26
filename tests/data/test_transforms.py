"""Augmentation keeps boxes on the pixels they cover."""

import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.data.config import default_data_config
from effdet_jax.data.counts import zero_counts
from effdet_jax.data.pipeline import eval_example, train_example
from effdet_jax.data.sources.base import Source
from effdet_jax.data.sources.shapes import shapes_label_map
from effdet_jax.data.transforms import denormalize_image, normalize_image, pad_to_max
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

H, W, S = 90, 150, 64
RECT = (20, 30, 50, 100)  # y0, x0, y1, x1 in pixels of the original image


def _example():
    image = np.zeros((H, W, 3), np.uint8)
    y0, x0, y1, x1 = RECT
    image[y0:y1, x0:x1] = 255
    box = np.array([[y0 / H, x0 / W, y1 / H, x1 / W]], np.float32)
    return {
        "image": tf.constant(image), "boxes": tf.constant(box), "classes": tf.constant([1]),
        "is_crowd": tf.constant([False]), "image_id": tf.constant(7, tf.int64),
        "readable": tf.constant(True), "counts": zero_counts(),
    }


def _source():
    return Source(tf.data.Dataset.range(1), 1, lambda r: r, shapes_label_map(3))


def _white_extent(image: np.ndarray) -> np.ndarray:
    u8 = denormalize_image(tf.constant(image), IMAGENET).numpy()
    mask = u8.mean(-1) > 127.5  # bilinear edges cross half-intensity at the true edge
    ys, xs = np.nonzero(mask)
    return np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], np.float32)


def test_normalisation_is_imagenet_mean_std():
    x = normalize_image(tf.constant([[[0, 128, 255]]], tf.uint8), IMAGENET).numpy()[0, 0]
    expected = (np.array([0, 128, 255]) - 255 * np.array([0.485, 0.456, 0.406])) / (
        255 * np.array([0.229, 0.224, 0.225]))
    np.testing.assert_allclose(x, expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_train_boxes_follow_pixels(seed):
    config = default_data_config()
    config.jitter_min, config.jitter_max = 0.6, 2.0
    out = train_example(config, _source(), S, _example(), tf.constant([seed, 3]), IMAGENET)
    classes = out["classes"].numpy()
    image = out["images"].numpy()
    assert image.shape == (S, S, 3)
    if classes[0] == -1:  # cropped out: no white pixel may remain
        assert int(out["counts"]["boxes_cropped_out"]) == 1
        assert denormalize_image(tf.constant(image), IMAGENET).numpy().max() < 128
        return
    box = out["boxes"].numpy()[0]
    np.testing.assert_allclose(_white_extent(image), box, atol=1.01)
    # Padding (bottom-right) is zero in normalised space.
    scale = float(out["image_scale"])
    valid_h, valid_w = int(H / scale), int(W / scale)
    if valid_h < S:
        assert np.all(image[valid_h + 1 :] == 0)
    if valid_w < S:
        assert np.all(image[:, valid_w + 1 :] == 0)


def test_flip_happens_for_some_seeds():
    config = default_data_config()
    config.jitter_min = config.jitter_max = 1.0
    x_starts = set()
    for seed in range(8):
        out = train_example(config, _source(), S, _example(), tf.constant([seed, 0]), IMAGENET)
        x_starts.add(round(float(out["boxes"].numpy()[0, 1]), 2))
    w = S * W / max(H, W) / W  # scale factor
    assert x_starts == {round(RECT[1] * w, 2), round((W - RECT[3]) * w, 2)}


def test_eval_resize_keeps_aspect_and_scale_maps_back():
    out = eval_example(default_data_config(), _source(), S, _example(), IMAGENET)
    scale = float(out["image_scale"])
    assert scale == pytest.approx(W / S)
    box = out["boxes"].numpy()[0]
    # Like automl, the resized size is truncated to whole pixels, so the short axis is off by
    # less than one network-input pixel when mapped back.
    np.testing.assert_allclose(box * scale, RECT, atol=scale)
    np.testing.assert_allclose(box[[1, 3]] * scale, [RECT[1], RECT[3]], atol=1e-4)
    np.testing.assert_allclose(_white_extent(out["images"].numpy()), box, atol=1.01)
    assert int(out["image_id"]) == 7


# RandAugment's Solarize inverts the image, so "brightest" no longer marks the rectangle there;
# tests/data/test_autoaugment.py checks every op and policy.
@pytest.mark.parametrize("policy,layers", [("v0", 0)])
def test_autoaugment_and_randaugment_keep_boxes_on_pixels(policy, layers):
    from effdet_jax.data import autoaugment

    ex = _example()
    for seed in range(6):
        image, boxes = autoaugment.distort(ex["image"], ex["boxes"], tf.constant([seed, 1]),
                                           policy=policy, randaugment_layers=layers)
        assert image.dtype == tf.uint8 and image.shape == (H, W, 3)
        box = boxes.numpy()[0] * [H, W, H, W]
        u8 = image.numpy().astype(float)
        inside = u8[int(box[0]) : int(box[2]), int(box[1]) : int(box[3])]
        if box[2] - box[0] > 2 and box[3] - box[1] > 2:
            # The rectangle is still the brightest thing and still inside its (moved) box.
            bright = u8.mean(-1) >= u8.mean(-1).max() - 1
            ys, xs = np.nonzero(bright)
            assert inside.size and ys.min() >= box[0] - 1 and ys.max() < box[2] + 1
            assert xs.min() >= box[1] - 1 and xs.max() < box[3] + 1


def test_translate_moves_boxes_with_pixels():
    from effdet_jax.data.autoaugment import apply_op

    ex = _example()
    for seed in range(2):
        image, boxes = apply_op("TranslateX_BBox", ex["image"], ex["boxes"], 1.0,
                                tf.constant([seed, 0]))
        ys, xs = np.nonzero(image.numpy().mean(-1) > 200)
        box = boxes.numpy()[0] * [H, W, H, W]
        np.testing.assert_allclose([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], box,
                                   atol=1e-3)
        assert abs(box[1] - RECT[1]) == pytest.approx(25, abs=1e-4)  # 250 px * level 1 / 10


def test_pad_to_max_keeps_the_largest_boxes_in_their_order():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 1, 1], [0, 0, 30, 30],
                      [5, 5, 35, 35]], np.float32)  # areas 100, 2500, 1, 900, 900 (a tie)
    classes = np.arange(5, dtype=np.int32)
    out_b, out_c, dropped = pad_to_max(tf.constant(boxes), tf.constant(classes), 2)
    assert int(dropped) == 3
    np.testing.assert_array_equal(out_c.numpy(), [1, 3])  # largest; the tie keeps the earlier
    np.testing.assert_array_equal(out_b.numpy(), boxes[[1, 3]])
    out_b, out_c, dropped = pad_to_max(tf.constant(boxes[:1]), tf.constant(classes[:1]), 3)
    assert int(dropped) == 0 and out_c.numpy().tolist() == [0, -1, -1]
    assert np.all(out_b.numpy()[1:] == -1)
    out_b, out_c, dropped = pad_to_max(tf.zeros([0, 4]), tf.zeros([0], tf.int32), 2)
    assert int(dropped) == 0 and out_c.numpy().tolist() == [-1, -1] and out_b.shape == (2, 4)
