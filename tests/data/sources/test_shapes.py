import numpy as np

from effdet_jax.data.sources.shapes import SHAPE_CLASSES, generate_shapes_example


def test_deterministic_and_seed_dependent():
    a = generate_shapes_example(0, 3, 96, 4, 2, 10)
    b = generate_shapes_example(0, 3, 96, 4, 2, 10)
    c = generate_shapes_example(1, 3, 96, 4, 2, 10)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_boxes_frame_the_drawn_colour():
    for index in range(6):
        image, boxes, classes = generate_shapes_example(0, index, 128, 6, 3, 12)
        h, w = image.shape[:2]
        assert 96 <= h <= 128 and 96 <= w <= 128
        assert 3 <= len(boxes) <= 12 and classes.min() >= 0 and classes.max() < 6
        for box, cls in zip(boxes.astype(int), classes, strict=True):
            y0, x0, y1, x1 = box
            assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
            colour = np.array(SHAPE_CLASSES[cls][2], float)
            close = np.abs(image.astype(float) - colour).max(-1) < 45
            # A later shape may cover part of this one, but each edge row/column of the box
            # touches the object's colour somewhere unless it is (rarely) fully covered.
            inside = close[y0:y1, x0:x1]
            assert inside.any()
            assert inside[0].any() or inside[-1].any()
            assert inside[:, 0].any() or inside[:, -1].any()


def test_classes_vary_and_overlaps_are_limited():
    counts = np.zeros(4, int)
    for index in range(20):
        _, boxes, classes = generate_shapes_example(5, index, 96, 4, 2, 10)
        counts += np.bincount(classes, minlength=4)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(
                    0, min(a[3], b[3]) - max(a[1], b[1]))
                union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
                assert inter / union <= 0.3 + 1e-6
    assert (counts > 5).all()
