"""The tiny D0 (64 px, 4 classes, random weights) the export tests write and run as files."""

import jax
import jax.numpy as jnp
import pytest

from effdet_jax import efficientdet

TINY_SIZE = 64


@pytest.fixture(scope="module")
def tiny():
    """``(model, variables)``: a 64-px D0 thinned to seconds per export, weights on the host."""
    model = efficientdet("efficientdet-d0", image_size=TINY_SIZE, num_classes=4,
                         fpn_num_filters=16, fpn_cell_repeats=1, box_class_repeats=1, max_level=5,
                         backbone_overrides={"width_coefficient": 0.25, "depth_coefficient": 0.25})
    variables = model.init(jax.random.key(0), jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3)), train=False)
    return model, jax.device_get(variables)
