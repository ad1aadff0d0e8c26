"""AutoAugment and RandAugment as automl's ``aug/autoaugment.py`` defines them.

automl's code needs tensorflow-addons and cannot run here, so every expected value is computed in
this file from automl's formulas (numpy, float32 where automl computes in float32, ``int()``
truncation where automl casts): level -> argument mappings, pixel values of the colour ops,
nearest-neighbour resampling of the geometric ops, box corners of translate / shear / rotate,
cutout sizes, the box-only ops touching only box pixels, and the probabilities. Every op has a
test that fails if the op is the identity. Images are uint8 [H,W,3]; boxes [N,4] yxyx normalised.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.data import augment_boxes, augment_ops, autoaugment_policies
from effdet_jax.data import autoaugment as A

FILL = 128
RNG = np.random.default_rng(0)
NOISE = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # fixed random image
TWO_BOXES = np.array([[0.1, 0.1, 0.4, 0.45], [0.5, 0.5, 0.9, 0.9]], np.float32)


def _op(name, image, boxes, level, seed=0, prob=1.0):
    im, bx = A.apply_op(name, tf.constant(image), tf.constant(boxes, tf.float32), level,
                        tf.constant([seed, 7]), prob)
    return im.numpy(), bx.numpy()


def _blend(a, b, factor):
    """automl's blend in float32, clipped, truncated to uint8."""
    a, b = np.float32(a), np.float32(b)
    return np.clip(a + np.float32(factor) * (b - a), 0, 255).astype(np.uint8)


def _gray_u8(image):
    """tf.image.rgb_to_grayscale on uint8: weights (0.2989, 0.587, 0.114) on v/255, then
    ``int(gray * 255.5)`` (convert_image_dtype back to uint8)."""
    x = image.astype(np.float32) / np.float32(255)
    g = x @ np.float32([0.2989, 0.587, 0.114])
    return np.clip(g * np.float32(255.5), 0, 255).astype(np.uint8)


def _resample(image, src_x, src_y):
    """Nearest neighbour (round half away from zero) at float32 source coordinates; outside the
    image -> FILL."""
    h, w = image.shape[:2]
    sx, sy = (np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)) for v in (src_x, src_y))
    sx, sy = sx.astype(int), sy.astype(int)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    out = np.full_like(image, FILL)
    out[inside] = image[sy[inside], sx[inside]]
    return out


def _grid(image):
    h, w = image.shape[:2]
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    return xs, ys


def _shear_x_ref(image, level):
    xs, ys = _grid(image)
    return _resample(image, xs + np.float32(level) * ys, ys)


def _shear_y_ref(image, level):
    xs, ys = _grid(image)
    return _resample(image, xs, ys + np.float32(level) * xs)


def _translate_ref(image, pixels, horizontal):
    xs, ys = _grid(image)
    return _resample(image, xs + pixels, ys) if horizontal else _resample(image, xs, ys + pixels)


def _equalize_ref(image):
    """PIL Equalize per channel (automl's TF version of it)."""
    out = image.copy()
    for c in range(3):
        ch = image[..., c].astype(np.int64)
        hist = np.bincount(ch.ravel(), minlength=256)
        used = hist[hist > 0]
        step = (used.sum() - used[-1]) // 255
        if step:
            below = np.concatenate([[0], np.cumsum(hist)[:-1]])
            out[..., c] = np.clip((below + step // 2) // step, 0, 255)[ch]
    return out


def _pixel_box(box, h, w):
    """automl's pixel extent of a box: rows int(h*y0) .. min(int(h*y1), h-1), same for x."""
    y0, x0, y1, x1 = (np.float32(box) * np.float32([h, w, h, w])).astype(int)
    return y0, x0, min(y1, h - 1), min(x1, w - 1)


def _open(box):
    """automl's _clip_bbox + _check_bbox_area."""
    box = np.clip(np.float32(box), 0, 1)
    for lo, hi in ((0, 2), (1, 3)):
        if box[hi] - box[lo] == 0:
            box[lo], box[hi] = min(box[lo], 0.95), max(box[hi], 0.05)
    return box


def _both_signs(name, image, boxes, level, reference):
    """``name`` at ``level`` equals ``reference(+1)`` or ``reference(-1)`` for every seed, and
    both signs occur over 12 seeds."""
    signs = set()
    for seed in range(12):
        im, bx = _op(name, image, boxes, level, seed)
        matches = [s for s in (1, -1) if all(np.array_equal(a, b) if a.dtype == np.uint8 else
                                             np.allclose(a, b, atol=1e-6)
                                             for a, b in zip((im, bx), reference(s), strict=True))]
        assert matches, (name, seed)
        signs.add(matches[0])
    assert signs == {1, -1}, name


# ---------------------------------------------------------------- tables and level -> argument


def test_every_policy_op_exists_and_randaugment_list_is_automls():
    names = {step[0] for policy in autoaugment_policies.POLICIES.values()
             for sub in policy for step in sub}
    assert names <= set(A.OPS), names - set(A.OPS)
    assert set(autoaugment_policies.RANDAUGMENT_OPS) <= set(A.OPS)
    assert [len(p) for p in autoaugment_policies.POLICIES.values()] == [5, 20, 15, 15]
    assert autoaugment_policies.RANDAUGMENT_OPS == (
        "Equalize", "Solarize", "Color", "Cutout", "SolarizeAdd", "TranslateX_BBox",
        "TranslateY_BBox", "ShearX_BBox", "ShearY_BBox", "Rotate_BBox")
    with pytest.raises(KeyError, match="unknown AutoAugment op 'Invert'"):
        _op("Invert", NOISE, TWO_BOXES, 5)


def test_enhance_level_to_factor():
    assert [A.enhance_factor(level) for level in (0, 5, 10)] == pytest.approx([0.1, 1.0, 1.9])


@pytest.mark.parametrize("name,level,arg", [
    ("Posterize", 8, 3), ("Posterize", 2, 0), ("Solarize", 6, 153), ("SolarizeAdd", 4, 44),
    ("Color", 6, 1.18), ("Sharpness", 2, 0.46), ("Cutout", 8, 80), ("BBox_Cutout", 4, 0.3),
    ("TranslateX_BBox", 4, 100), ("TranslateY_BBox", 6, 150), ("ShearX_BBox", 10, 0.3),
    ("ShearY_Only_BBoxes", 2, 0.06), ("Rotate_BBox", 8, 24), ("TranslateY_Only_BBoxes", 6, 72),
    ("Cutout_Only_BBoxes", 6, 30), ("Solarize_Only_BBoxes", 8, 204), ("Equalize", 10, 0),
])
def test_level_to_arg_is_automls(name, level, arg):
    """automl's level_to_arg by hand (L = level / 10): int(L*4), int(L*256), int(L*110),
    L*1.8+0.1, int(L*100), L*0.75, L*250, L*0.3, L*30, L*120, int(L*50) (before the sign)."""
    assert A.level_to_arg(name, level) == pytest.approx(arg)


@pytest.mark.parametrize("name", sorted(A.OPS))
def test_no_op_is_the_identity(name):
    """Every op changes a noise image of values 30..157 (or its boxes) at level 6 (box-only ops
    on every box), so none is a placeholder. Each op's values are checked below."""
    image = NOISE // 2 + 30
    out, bx = _op(name, image, TWO_BOXES, 6, seed=1, prob=3.0)
    assert not (np.array_equal(out, image) and np.array_equal(bx, TWO_BOXES)), name


# ---------------------------------------------------------------- colour ops


def test_color_blends_from_grey():
    image = np.array([[[200, 100, 50], [10, 250, 90]]], np.uint8)
    out, _ = _op("Color", image, TWO_BOXES, 6)  # factor 6/10*1.8+0.1 = 1.18
    grey = np.repeat(_gray_u8(image)[..., None], 3, -1)
    np.testing.assert_array_equal(out, _blend(grey, image, 1.18))
    assert _gray_u8(image)[0, 0] == 124  # int((0.2989*200+0.587*100+0.114*50)/255*255.5)
    np.testing.assert_array_equal(out[0, 0], [213, 95, 36])  # 124 + 1.18 * (v - 124)


def test_contrast_blends_from_the_truncated_mean_grey():
    # Grey levels 100, 100, 100, 190: mean 122.5 -> degenerate 122 (uint8), factor 1.18.
    image = np.array([[[100] * 3, [100] * 3], [[100] * 3, [190] * 3]], np.uint8)
    out, _ = _op("Contrast", image, TWO_BOXES, 6)
    np.testing.assert_array_equal(out, _blend(np.full_like(image, 122), image, 1.18))
    np.testing.assert_array_equal(out[:, :, 0], [[96, 96], [96, 202]])  # mean 122.5 gives 95


def test_brightness_blends_from_black():
    out, _ = _op("Brightness", NOISE, TWO_BOXES, 2)  # factor 0.46
    np.testing.assert_array_equal(out, _blend(np.zeros_like(NOISE), NOISE, 0.46))


def test_sharpness_uses_the_smooth_kernel_inside_and_keeps_the_border():
    image = np.full((5, 5, 3), 10, np.uint8)
    image[2, 2] = 130
    out, _ = _op("Sharpness", image, TWO_BOXES, 8)  # factor 1.54
    # Smoothed: centre (8*10 + 5*130)/13 = 56.15 -> 56; its 8 neighbours (7*10+130+5*10)/13 -> 19.
    np.testing.assert_array_equal(out[2, 2], [int(np.float32(56) + np.float32(1.54) * 74)] * 3)
    assert out[2, 2, 0] == 169
    assert (out[1:4, 1:4][np.arange(9).reshape(3, 3) != 4] == 5).all()  # 19 + 1.54 * (10 - 19)
    border = np.ones((5, 5), bool)
    border[1:4, 1:4] = False
    assert (out[border] == 10).all()


def test_equalize_maps_by_the_cumulative_histogram():
    values = np.array([10] * 510 + [50] * 255 + [90] * 235, np.uint8)  # 1000 pixels
    image = np.stack([values.reshape(20, 50)] * 3, -1)
    out, _ = _op("Equalize", image, TWO_BOXES, 10)
    # step = (1000 - 235) // 255 = 3; v -> (pixels below v + 1) // 3: 10->0, 50->170, 90->255.
    lut = {10: 0, 50: 170, 90: 255}
    np.testing.assert_array_equal(out, np.vectorize(lut.get)(image))
    np.testing.assert_array_equal(_op("Equalize", NOISE, TWO_BOXES, 0)[0], _equalize_ref(NOISE))


def test_autocontrast_stretches_each_channel():
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0] = [[0, 10], [20, 51]]  # lo 0, hi 51: scale 5
    image[..., 1] = [[0, 255], [3, 4]]  # already full range: unchanged
    image[..., 2] = 77  # flat: unchanged
    out, _ = _op("AutoContrast", image, TWO_BOXES, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 50], [100, 255]])
    np.testing.assert_array_equal(out[..., 1:], image[..., 1:])


def test_posterize_bits_from_level():
    image = np.array([[[200, 100, 77]]], np.uint8)
    # level 10 -> 4 bits (v & 0xF0); level 8 -> int(3.2) = 3 bits (v & 0xE0);
    # level 2 -> 0 bits: TF clamps the uint8 shift of 8 to 7, so the top bit stays (as in automl).
    assert _op("Posterize", image, TWO_BOXES, 10)[0].tolist() == [[[192, 96, 64]]]
    assert _op("Posterize", image, TWO_BOXES, 8)[0].tolist() == [[[192, 96, 64]]]
    assert _op("Posterize", image, TWO_BOXES, 6)[0].tolist() == [[[192, 64, 64]]]  # 2 bits
    assert _op("Posterize", image, TWO_BOXES, 2)[0].tolist() == [[[128, 0, 0]]]


def test_solarize_threshold_from_level():
    image = np.array([[[100, 127, 128], [200, 255, 0]]], np.uint8)
    # level 5 -> threshold int(0.5*256) = 128: v >= 128 -> 255 - v.
    assert _op("Solarize", image, TWO_BOXES, 5)[0].tolist() == [[[100, 127, 127], [55, 0, 0]]]
    # level 10 -> threshold 256, which automl's uint8 comparison wraps to 0: every value inverted
    # (RandAugment's magnitude 15: 384 -> 128).
    np.testing.assert_array_equal(_op("Solarize", image, TWO_BOXES, 10)[0], 255 - image)
    np.testing.assert_array_equal(_op("Solarize", image, TWO_BOXES, 15)[0],
                                  _op("Solarize", image, TWO_BOXES, 5)[0])


def test_solarize_add_adds_below_128():
    image = np.array([[[100, 127, 128], [200, 250, 0]]], np.uint8)
    # level 5 -> addition int(0.5*110) = 55; level 10 -> 110 (clipped at 255).
    assert _op("SolarizeAdd", image, TWO_BOXES, 5)[0].tolist() == [[[155, 182, 128], [200, 250, 55]]]
    assert _op("SolarizeAdd", image, TWO_BOXES, 10)[0].tolist() == [[[210, 237, 128], [200, 250, 110]]]


# ---------------------------------------------------------------- cutout


def _filled_rect(before, after):
    """(y0, x0, y1, x1) of the pixels that changed to FILL; asserts they form one rectangle."""
    ys, xs = np.nonzero((after != before).any(-1))
    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    assert (after[y0:y1, x0:x1] == FILL).all()
    assert (after[(after != before).any(-1)] == FILL).all()
    return y0, x0, y1, x1


def test_cutout_is_a_square_of_twice_the_level_size():
    image = np.zeros((100, 100, 3), np.uint8)
    sizes = []
    for seed in range(12):
        out, bx = _op("Cutout", image, TWO_BOXES, 1, seed)  # pad int(0.1*100) = 10
        y0, x0, y1, x1 = _filled_rect(image, out)
        sizes.append((y1 - y0, x1 - x0))
        assert y1 - y0 <= 20 and x1 - x0 <= 20
        assert (y1 - y0 == 20 or y0 == 0 or y1 == 100) and (x1 - x0 == 20 or x0 == 0 or x1 == 100)
        np.testing.assert_array_equal(bx, TWO_BOXES)
    assert (20, 20) in sizes
    out, _ = _op("Cutout", np.zeros((400, 400, 3), np.uint8), TWO_BOXES, 8, 3)  # v0: pad 80
    assert max(np.subtract(_filled_rect(np.zeros_like(out), out)[2:], [0, 0])) > 0
    y0, x0, y1, x1 = _filled_rect(np.zeros_like(out), out)
    assert y1 - y0 <= 160 and x1 - x0 <= 160 and (y1 - y0 == 160 or y0 == 0 or y1 == 400)


def test_bbox_cutout_cuts_inside_one_box():
    image = np.zeros((100, 100, 3), np.uint8)
    box = np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)  # pixels rows 10..50, cols 20..60
    for seed in range(6):
        out, bx = _op("BBox_Cutout", image, box, 4, seed)  # pad fraction 0.4 * 0.75 = 0.3
        y0, x0, y1, x1 = _filled_rect(image, out)
        # half sizes int(0.3 * 41 / 2) = 6 per axis; the centre is a pixel of the box.
        assert (y1 - y0, x1 - x0) == (12, 12)
        assert 10 <= y0 + 6 <= 50 and 20 <= x0 + 6 <= 60
        np.testing.assert_array_equal(bx, box)
    out, _ = _op("BBox_Cutout", image, np.zeros((0, 4), np.float32), 10)
    np.testing.assert_array_equal(out, image)


# ---------------------------------------------------------------- geometric ops with boxes


def _translate_box_ref(box, h, w, pixels, horizontal):
    y0, x0, y1, x1 = (np.float32(box) * np.float32([h, w, h, w])).astype(int)
    if horizontal:
        x0, x1 = max(0, x0 - pixels), min(w, x1 - pixels)
    else:
        y0, y1 = max(0, y0 - pixels), min(h, y1 - pixels)
    return _open(np.float32([y0, x0, y1, x1]) / np.float32([h, w, h, w]))


@pytest.mark.parametrize("name,level,pixels", [("TranslateX_BBox", 4, 100),
                                                ("TranslateY_BBox", 2, 50)])
def test_translate_moves_content_and_boxes(name, level, pixels):
    horizontal = name == "TranslateX_BBox"
    image = RNG.integers(0, 256, (160, 200, 3), dtype=np.uint8)
    boxes = np.array([[0.1, 0.2, 0.5, 0.6], [0.7, 0.7, 0.9, 0.95]], np.float32)

    def reference(sign):
        p = sign * pixels  # level / 10 * 250
        return (_translate_ref(image, p, horizontal),
                np.stack([_translate_box_ref(b, 160, 200, p, horizontal) for b in boxes]))

    _both_signs(name, image, boxes, level, reference)
    # By hand: TranslateX +100 on the 200-px width: x 40..120 -> 0..20, x 140..190 -> 40..90.
    if horizontal:
        np.testing.assert_allclose(reference(1)[1], [[0.1, 0.0, 0.5, 0.1], [0.7, 0.2, 0.9, 0.45]])
        np.testing.assert_array_equal(reference(1)[0][:, :100], image[:, 100:])


def test_a_box_moved_out_of_the_image_becomes_a_5_percent_strip():
    image = np.zeros((20, 100, 3), np.uint8)
    _, bx = augment_boxes.translate_with_boxes(tf.constant(image), tf.constant([[0.2, 0.1, 0.6, 0.3]]),
                                               50, horizontal=True)
    np.testing.assert_allclose(bx.numpy(), [[0.2, 0.0, 0.6, 0.05]])  # x 10..30 - 50 -> 0..0


def _corner_box_ref(box, h, w, matrix, centred):
    """automl's _shear_bbox (centred=False) / _rotate_bbox (centred=True) in float32."""
    size = np.float32([h, w, h, w])
    if centred:
        y0, x0, y1, x1 = (size * (np.float32(box) - np.float32(0.5))).astype(np.int32)
        y0, y1 = -y0, -y1
    else:
        y0, x0, y1, x1 = (size * np.float32(box)).astype(np.int32)
    corners = np.float32([[y0, y0, y1, y1], [x0, x1, x0, x1]])
    moved = (np.float32(matrix) @ corners).astype(np.int32).astype(np.float32)
    if centred:
        out = [-(moved[0].max() / np.float32(h) - np.float32(0.5)),
               moved[1].min() / np.float32(w) + np.float32(0.5),
               -(moved[0].min() / np.float32(h) - np.float32(0.5)),
               moved[1].max() / np.float32(w) + np.float32(0.5)]
    else:
        out = [moved[0].min() / h, moved[1].min() / w, moved[0].max() / h, moved[1].max() / w]
    return _open(out)


@pytest.mark.parametrize("name", ["ShearX_BBox", "ShearY_BBox"])
def test_shear_moves_pixels_and_box_corners(name):
    horizontal = name == "ShearX_BBox"
    image = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    boxes = np.array([[0.25, 0.25, 0.75, 0.75], [0.5, 0.1, 0.9, 0.4]], np.float32)

    def reference(sign):
        level = np.float32(sign * 0.3)  # level 10 -> 0.3
        matrix = [[1, 0], [-level, 1]] if horizontal else [[1, -level], [0, 1]]
        ref = _shear_x_ref if horizontal else _shear_y_ref
        return ref(image, level), np.stack([_corner_box_ref(b, 40, 48, matrix, False) for b in boxes])

    _both_signs(name, image, boxes, 10, reference)
    # By hand, ShearX +0.3: box pixels y 10..30, x 12..36 -> x' = x - 0.3 y: min 12-9, max 36-3.
    if horizontal:
        np.testing.assert_allclose(reference(1)[1][0] * [40, 48, 40, 48], [10, 2, 30, 32], atol=1)
        dot = np.zeros((20, 40, 3), np.uint8)
        dot[10, 20] = 255
        out = augment_ops.shear_x(tf.constant(dot), 0.3).numpy()
        ys, xs = np.nonzero(out[..., 0] == 255)
        assert (ys.tolist(), xs.tolist()) == ([10], [17])  # x 20 - 0.3 * 10


def test_rotate_by_90_degrees_is_rot90_and_moves_the_box_with_the_content():
    image = RNG.integers(0, 256, (100, 100, 3), dtype=np.uint8)
    out = augment_ops.rotate(tf.constant(image), 90.0).numpy()
    np.testing.assert_array_equal(out, np.rot90(image, 1, axes=(0, 1)))  # counter-clockwise
    white = np.zeros((100, 100, 3), np.uint8)
    white[10:30, 20:60] = 255
    box = np.array([[0.1, 0.2, 0.3, 0.6]], np.float32)
    rotated, bx = augment_boxes.rotate_with_boxes(tf.constant(white), tf.constant(box), 90.0)
    ys, xs = np.nonzero(rotated.numpy()[..., 0] == 255)
    # Content rows 40..79, cols 10..29; automl's corner formula truncates the centred corners
    # toward zero (0.3 - 0.5 -> -19.99999 -> -19 px), so sides may move inwards by up to 2 px.
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 79, 10, 29)
    np.testing.assert_allclose(bx.numpy()[0], [0.4, 0.1, 0.8, 0.3], atol=0.021)


def test_rotate_bbox_level_maps_to_30_degrees():
    image = RNG.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    boxes = np.array([[0.2, 0.3, 0.6, 0.5], [0.05, 0.6, 0.3, 0.95]], np.float32)

    def reference(sign):
        deg = sign * 30.0  # level 10 -> 30 degrees
        rad = np.float32(deg * np.pi / 180)
        c, s = np.cos(rad), np.sin(rad)
        matrix = np.float32([[c, s], [-s, c]])
        im = augment_ops.rotate(tf.constant(image), deg).numpy()
        return im, np.stack([_corner_box_ref(b, 50, 60, matrix, True) for b in boxes])

    _both_signs("Rotate_BBox", image, boxes, 10, reference)
    # The image matrix is tfa's: output (x, y) reads the input at R(-a) about the centre.
    out = augment_ops.rotate(tf.constant(image), 30.0).numpy()
    xs, ys = _grid(image)
    cx, cy, c, s = 29.5, 24.5, np.cos(np.pi / 6), np.sin(np.pi / 6)
    ref = _resample(image, np.float32(c * (xs - cx) - s * (ys - cy) + cx),
                    np.float32(s * (xs - cx) + c * (ys - cy) + cy))
    assert np.mean(out != ref) < 0.01  # rounding ties of float32 coordinates only
    # The box of a bright rectangle holds the rotated rectangle (within automl's 2 px).
    white = np.zeros((50, 60, 3), np.uint8)
    white[10:30, 18:30] = 255
    rotated, bx = augment_boxes.rotate_with_boxes(
        tf.constant(white), tf.constant([[0.2, 0.3, 0.6, 0.5]]), 30.0)
    ys, xs = np.nonzero(rotated.numpy()[..., 0] == 255)
    y0, x0, y1, x1 = bx.numpy()[0] * [50, 60, 50, 60]
    assert y0 - 2 <= ys.min() and ys.max() <= y1 + 2 and x0 - 2 <= xs.min() and xs.max() <= x1 + 2


# ---------------------------------------------------------------- box-only ops


def _only_box_reference(image, boxes, region_fn):
    out = image.copy()
    for box in boxes:
        y0, x0, y1, x1 = _pixel_box(box, *image.shape[:2])
        out[y0:y1 + 1, x0:x1 + 1] = region_fn(out[y0:y1 + 1, x0:x1 + 1])
    return out


def _outside_unchanged(image, out, boxes):
    inside = np.zeros(image.shape[:2], bool)
    for box in boxes:
        y0, x0, y1, x1 = _pixel_box(box, *image.shape[:2])
        inside[y0:y1 + 1, x0:x1 + 1] = True
    np.testing.assert_array_equal(out[~inside], image[~inside])
    assert not np.array_equal(out[inside], image[inside])


# prob 3.0: each box with probability 3.0 / 3 = 1, so the effect is deterministic.
@pytest.mark.parametrize("name,level,region_ref", [
    ("Flip_Only_BBoxes", 0, lambda r, s: r[:, ::-1]),
    ("Solarize_Only_BBoxes", 5, lambda r, s: np.where(r < 128, r, 255 - r)),
    ("Equalize_Only_BBoxes", 0, lambda r, s: _equalize_ref(r)),
    ("TranslateX_Only_BBoxes", 1, lambda r, s: _translate_ref(r, s * 12, True)),  # 0.1 * 120
    ("TranslateY_Only_BBoxes", 1, lambda r, s: _translate_ref(r, s * 12, False)),
    ("ShearX_Only_BBoxes", 4, lambda r, s: _shear_x_ref(r, np.float32(s * 0.12))),  # 0.4 * 0.3
    ("ShearY_Only_BBoxes", 4, lambda r, s: _shear_y_ref(r, np.float32(s * 0.12))),
    ("Rotate_Only_BBoxes", 10, lambda r, s: augment_ops.rotate(tf.constant(r), s * 30.0).numpy()),
])
def test_box_only_op_changes_only_box_pixels(name, level, region_ref):
    signs = set()
    for seed in range(8):
        out, bx = _op(name, NOISE, TWO_BOXES, level, seed, prob=3.0)
        np.testing.assert_array_equal(bx, TWO_BOXES)
        _outside_unchanged(NOISE, out, TWO_BOXES)
        matches = [s for s in (1, -1) if np.array_equal(
            out, _only_box_reference(NOISE, TWO_BOXES, lambda r, s=s: region_ref(r, s)))]
        assert matches, (name, seed)
        if len(matches) == 1:
            signs.add(matches[0])
    if "Translate" in name or "Shear" in name or "Rotate" in name:
        assert signs == {1, -1}  # one sign per image, drawn each time


def test_cutout_only_boxes_cuts_a_square_inside_each_box():
    image = np.zeros((48, 64, 3), np.uint8)
    out, _ = _op("Cutout_Only_BBoxes", image, TWO_BOXES, 2, 1, prob=3.0)  # pad int(0.2*50) = 10
    _outside_unchanged(image, out, TWO_BOXES)
    for box in TWO_BOXES:
        y0, x0, y1, x1 = _pixel_box(box, 48, 64)
        region = out[y0:y1 + 1, x0:x1 + 1]
        ry0, rx0, ry1, rx1 = _filled_rect(np.zeros_like(region), region)
        assert ry1 - ry0 <= 20 and rx1 - rx0 <= 20


def test_box_only_ops_apply_to_each_box_with_a_third_of_the_probability():
    box = np.array([[0.1, 0.1, 0.4, 0.45]], np.float32)
    fn = tf.function(lambda seed: A.apply_op("Flip_Only_BBoxes", tf.constant(NOISE),
                                             tf.constant(box), 10, seed, 0.6)[0])
    flipped = sum(not np.array_equal(fn(tf.constant([s, 1])).numpy(), NOISE) for s in range(300))
    assert 35 <= flipped <= 85  # 300 * 0.6 / 3 = 60 expected, sd 6.9
    out, _ = _op("Flip_Only_BBoxes", NOISE, np.zeros((0, 4), np.float32), 10, prob=3.0)
    np.testing.assert_array_equal(out, NOISE)


# ---------------------------------------------------------------- probabilities and policies


def test_policy_step_probability():
    fn = tf.function(lambda seed: A.apply_step("Solarize", 0.4, 10, tf.constant(NOISE),
                                               tf.constant(TWO_BOXES), seed)[0])
    applied = sum(not np.array_equal(fn(tf.constant([s, 2])).numpy(), NOISE) for s in range(200))
    assert 55 <= applied <= 105  # 200 * 0.4 = 80, sd 6.9
    for seed in range(5):
        im, _ = A.apply_step("Solarize", 0.0, 10, tf.constant(NOISE), tf.constant(TWO_BOXES),
                             tf.constant([seed, 2]))
        np.testing.assert_array_equal(im.numpy(), NOISE)
        im, _ = A.apply_step("Solarize", 1.0, 10, tf.constant(NOISE), tf.constant(TWO_BOXES),
                             tf.constant([seed, 2]))
        np.testing.assert_array_equal(im.numpy(), 255 - NOISE)


def test_one_sub_policy_is_drawn_uniformly(monkeypatch):
    monkeypatch.setitem(autoaugment_policies.POLICIES, "two", (
        (("Solarize", 1.0, 10),),  # inverts
        (("Brightness", 1.0, 0), ("Solarize", 1.0, 10)),  # factor 0.1, then inverts
    ))
    fn = tf.function(lambda seed: A.distort(tf.constant(NOISE), tf.constant(TWO_BOXES), seed,
                                            policy="two")[0])
    first = 255 - NOISE
    second = 255 - _blend(np.zeros_like(NOISE), NOISE, 0.1)
    picks = []
    for s in range(100):
        out = fn(tf.constant([s, 3])).numpy()
        picks.append(0 if np.array_equal(out, first) else 1 if np.array_equal(out, second) else -1)
    assert -1 not in picks and 30 <= sum(picks) <= 70


def test_randaugment_always_applies_the_drawn_op():
    """At magnitude 10 every op of the list changes a noise image; automl applies the drawn op
    with no extra coin flip."""
    fn = tf.function(lambda seed: A.randaugment(tf.constant(NOISE), tf.constant(TWO_BOXES), 1, 10,
                                                seed)[0])
    assert all(not np.array_equal(fn(tf.constant([s, 4])).numpy(), NOISE) for s in range(30))


@pytest.mark.parametrize("policy,layers", [("v0", 0), ("v1", 0), ("v2", 0), ("v3", 0),
                                           ("randaug", 0), ("", 2)])
def test_policies_run_in_tf_data_and_keep_boxes_valid(policy, layers):
    def examples():
        rng = np.random.default_rng(1)
        for i in range(8):
            image = rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8)
            yx = rng.uniform(0, 0.6, (i % 4, 2))
            hw = rng.uniform(0.05, 0.4, (i % 4, 2))
            yield image, np.concatenate([yx, yx + hw], -1).astype(np.float32), i

    signature = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, 4], tf.float32),
                 tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.from_generator(examples, output_signature=signature)

    def augment(image, boxes, i):
        seed = tf.stack([tf.cast(i, tf.int32), 5])
        out, bx = A.distort(image, boxes, seed, policy=policy, randaugment_layers=layers)
        return image, out, boxes, bx

    changed = 0
    for image, out, boxes, bx in ds.map(augment).as_numpy_iterator():
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert bx.shape == boxes.shape and bx.dtype == np.float32
        assert ((bx >= 0) & (bx <= 1)).all()
        assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()
        changed += not np.array_equal(out, image)
    assert changed >= 3


def test_training_pipeline_applies_the_policy():
    """``make_train_pipeline`` with ``autoaugment_policy="v0"``: the same examples and seed give
    other images than without it, and every box stays inside the input with a positive area."""
    from effdet_jax.data.pipeline import make_train_pipeline
    from effdet_jax.models.model_config import IMAGENET_NORMALIZATION

    from .helpers import take, tiny_shapes_config, valid_rows

    batches = {}
    for policy in ("", "v0"):
        config = tiny_shapes_config(autoaugment_policy=policy, hflip=False)
        batches[policy] = take(make_train_pipeline(config, 64, 4,
                                                   normalization=IMAGENET_NORMALIZATION), 2)
    for plain, augmented in zip(batches[""], batches["v0"], strict=True):
        np.testing.assert_array_equal(plain["image_id"], augmented["image_id"])
        assert not np.array_equal(plain["images"], augmented["images"])
        for b in range(4):
            boxes, _ = valid_rows(augmented, b)
            assert ((boxes >= 0) & (boxes <= 64)).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
