"""TensorFlow's SAME padding (``effdet_jax.ops.padding``)."""

from effdet_jax.ops.padding import tf_same_padding


def test_tf_same_padding_formula():
    # out = ceil(in / stride); odd pixel of padding after.
    assert tf_same_padding(8, 3, 2) == (0, 1)
    assert tf_same_padding(7, 3, 2) == (1, 1)
    assert tf_same_padding(5, 3, 2) == (1, 1)
    assert tf_same_padding(9, 5, 1) == (2, 2)
    assert tf_same_padding(8, 1, 2) == (0, 0)
