"""TF1's legacy nearest resize (``effdet_jax.ops.resize``) against TensorFlow's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from effdet_jax.ops.resize import resize_nearest_legacy


@pytest.mark.parametrize("src,dst", [(3, 5), (5, 10), (4, 8), (10, 20), (20, 40), (5, 9), (7, 13)])
def test_legacy_nearest_resize_matches_tf1(src, dst):
    x = np.random.default_rng(src * dst).standard_normal((1, src, src, 2)).astype(np.float32)
    ref = tf.compat.v1.image.resize_nearest_neighbor(x, (dst, dst)).numpy()
    out = np.asarray(resize_nearest_legacy(jnp.asarray(x), dst, dst))
    np.testing.assert_array_equal(out, ref)


def test_legacy_nearest_differs_from_half_pixel_rule():
    # automl quirk 4: 3 -> 5 picks rows [0, 0, 1, 1, 2]; jax.image.resize's half-pixel rule does not.
    x = jnp.arange(3.0).reshape(1, 3, 1, 1)
    ours = resize_nearest_legacy(x, 5, 1)[0, :, 0, 0]
    np.testing.assert_array_equal(np.asarray(ours), [0, 0, 1, 1, 2])
    theirs = jax.image.resize(x, (1, 5, 1, 1), "nearest")[0, :, 0, 0]
    assert not np.array_equal(np.asarray(theirs), np.asarray(ours))
