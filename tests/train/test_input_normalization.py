"""The model's input normalisation is what the pipelines feed and what drawing undoes.

lite models expect ``(u8 - 127) / 128`` and D0-D7x ImageNet's ``(u8 - 255*mean) / (255*std)``
(automl's ``mean_rgb`` / ``stddev_rgb``). A one-colour image goes through the train and eval
examples with the normalisation the trainer resolves from ``config.model``, and the eval summary
drawing turns the pipeline's images back into the same uint8 colour.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import tensorflow as tf

from effdet_jax import data as data_lib
from effdet_jax import visualize
from effdet_jax.data.counts import zero_counts
from effdet_jax.data.pipeline import eval_example, train_example
from effdet_jax.data.sources.base import Source
from effdet_jax.data.sources.shapes import shapes_label_map
from effdet_jax.train import batches, experiment, trainer

S = 64
COLOUR = np.array([10, 128, 250], np.uint8)
# name -> (mean_rgb, stddev_rgb) automl uses for it (hparams.json)
EXPECTED = {
    "lite0": ((127.0,) * 3, (128.0,) * 3),
    "d0": ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def _example() -> dict:
    """A one-colour 80x80 image with one box."""
    image = np.broadcast_to(COLOUR, (80, 80, 3)).copy()
    return {
        "image": tf.constant(image), "boxes": tf.constant([[0.25, 0.25, 0.75, 0.75]]),
        "classes": tf.constant([1]), "is_crowd": tf.constant([False]),
        "image_id": tf.constant(3, tf.int64), "readable": tf.constant(True),
        "counts": zero_counts(),
    }


def _source() -> Source:
    return Source(tf.data.Dataset.range(1), 1, lambda r: r, shapes_label_map(3))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_train_and_eval_examples_feed_the_models_normalisation(name):
    config = _config(name)
    normalization = experiment.input_normalization(config.model)
    mean, std = EXPECTED[name]
    np.testing.assert_allclose(normalization, (mean, std))
    want = (COLOUR - np.array(mean)) / np.array(std)
    config.data.jitter_min = config.data.jitter_max = 1.0  # the image fills the S x S input
    train = train_example(config.data, _source(), S, _example(), tf.constant([1, 2]),
                          normalization)
    evals = eval_example(config.data, _source(), S, _example(), normalization)
    for out in (train, evals):
        np.testing.assert_allclose(out["images"].numpy(), np.broadcast_to(want, (S, S, 3)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trainer_pipelines_and_drawing_use_the_models_normalisation(name, monkeypatch):
    config = _config(name)
    config.data.source = "shapes"
    config.data.shapes.num_train = config.data.shapes.num_eval = 4
    config.data.shapes.image_size = S
    config.train.batch_size = config.eval.batch_size = 2
    expected = experiment.input_normalization(config.model)
    np.testing.assert_allclose(expected, EXPECTED[name])

    seen = {}
    make_train = data_lib.make_train_pipeline

    def recording(*args, **kwargs):
        seen["train"] = kwargs["normalization"]
        return make_train(*args, **kwargs)

    monkeypatch.setattr(data_lib, "make_train_pipeline", recording)
    next(batches.train_batches(config, S))
    pipeline = batches.eval_pipeline(config, S)
    assert seen["train"] == expected and pipeline.normalization == expected

    # Drawing de-normalises with the pipeline's constants: a normalised one-colour image (no
    # detection above the threshold) comes back as its uint8 colour.
    mean, std = (np.array(v) for v in expected)
    images = np.broadcast_to((COLOUR - mean) / std, (1, S, S, 3)).astype(np.float32)
    detections = {"boxes": np.zeros((1, 1, 4)), "scores": np.zeros((1, 1)),
                  "classes": np.zeros((1, 1), np.int32)}
    drawn = trainer._draw(images, detections, ["a"], pipeline.normalization)
    np.testing.assert_array_equal(drawn[0], np.broadcast_to(COLOUR, (S, S, 3)))

    # predict's preprocessing uses the same normalisation.
    network_input, _ = visualize.preprocess_for_eval(
        np.broadcast_to(COLOUR, (S, S, 3)).copy(), S, expected)
    np.testing.assert_allclose(network_input, images[0], rtol=1e-5, atol=1e-6)


def test_model_overrides_set_the_normalisation_of_pipelines_and_model_alike():
    """A model trained with other statistics sets them once, in ``config.model.overrides``."""
    config = _config("lite0")
    config.model.overrides.mean_rgb = (0.0, 0.0, 0.0)
    config.model.overrides.stddev_rgb = 255.0  # one value for all channels, as automl's lite
    want = ((0.0, 0.0, 0.0), (255.0, 255.0, 255.0))
    assert experiment.input_normalization(config.model) == want
    assert experiment.build_model(config.model).config.normalization == want
    config = _config("lite0")
    config.model.overrides.stddev_rgb = (1.0, 2.0)
    with pytest.raises(ValueError, match="stddev_rgb"):
        experiment.input_normalization(config.model)
