import numpy as np
import tensorflow as tf

from effdet_jax.data.sanitize import sanitize_boxes


def test_each_bad_box_is_fixed_or_dropped_and_counted():
    nan = float("nan")
    boxes = np.array([
        [0.1, 0.1, 0.5, 0.5],    # good
        [nan, 0.1, 0.5, 0.5],    # NaN -> dropped
        [0.6, 0.7, 0.2, 0.3],    # inverted -> swapped
        [-0.2, 0.5, 0.4, 1.3],   # out of range -> clipped
        [0.3, 0.3, 0.3, 0.6],    # zero height -> dropped
        [1.2, 0.1, 1.5, 0.2],    # entirely outside -> zero area after clipping -> dropped
        [0.1, 0.1, 0.2, 0.2],    # unknown class 7 -> dropped
    ], np.float32)  # fmt: skip
    classes = np.array([0, 1, 2, 0, 1, 2, 7], np.int32)
    crowd = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    b, c, k, counts = sanitize_boxes(tf.constant(boxes), tf.constant(classes),
                                     tf.constant(crowd), 3)
    np.testing.assert_allclose(b.numpy(), [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.6, 0.7],
                                           [0.0, 0.5, 0.4, 1.0]], atol=1e-7)
    np.testing.assert_array_equal(c.numpy(), [0, 2, 0])
    np.testing.assert_array_equal(k.numpy(), [False, True, False])
    assert {n: int(v) for n, v in counts.items()} == {
        "boxes_nan_dropped": 1, "boxes_unknown_class_dropped": 1, "boxes_inverted_fixed": 1,
        "boxes_clipped": 1, "boxes_degenerate_dropped": 2,
    }
