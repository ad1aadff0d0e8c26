"""The tfds eval split's json files: ``eval_annotations`` (official ground truth) and
``eval_image_info`` (test-dev's image list): the image filter, and bad paths failing early with the
key and the fix."""

import json

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from effdet_jax.data.config import validate_data_config
from effdet_jax.data.sources import DataUnavailableError, check_available
from effdet_jax.data.sources.tfds import _listed, image_info_ids

from ..helpers import tiny_shapes_config


def test_image_info_filter_keeps_exactly_the_listed_ids(tmp_path):
    info = tmp_path / "image_info_test-dev2017.json"
    info.write_text(json.dumps({"images": [{"id": 33}, {"id": 9}, {"id": 1000}],
                                "categories": []}))
    ids = image_info_ids(str(info))
    assert ids == [9, 33, 1000]
    examples = tf.data.Dataset.from_tensor_slices({"image/id": tf.constant([5, 9, 11, 33, 20])})
    kept = [int(ex["image/id"]) for ex in examples.filter(_listed(ids))]
    assert kept == [9, 33]


def test_unreadable_image_info_names_the_key(tmp_path):
    bad = tmp_path / "info.json"
    bad.write_text(json.dumps({"info": {}}))
    with pytest.raises(ValueError, match=r"config.data.eval_image_info=.*'images' list"):
        image_info_ids(str(bad))


def test_eval_image_info_is_for_tfds_only():
    c = tiny_shapes_config(eval_image_info="image_info_test-dev2017.json")
    with pytest.raises(ValueError, match=r"eval_image_info.*set eval_annotations to the image-info"):
        validate_data_config(c)


@pytest.mark.parametrize("key", ["eval_annotations", "eval_image_info"])
def test_missing_eval_json_fails_before_anything_is_built(tmp_path, key):
    c = tiny_shapes_config(source="tfds", tfds_name="coco/2017", tfds_data_dir=str(tmp_path))
    c.eval_split = "validation"
    c[key] = str(tmp_path / "missing.json")
    with tfds.testing.mock_data(num_examples=2):
        check_available(c, ("train",))  # a training-only run does not need it
        with pytest.raises(DataUnavailableError, match=rf"config.data.{key}='.*missing.json' is "
                                                       r"not a readable file.*--config.data"):
            check_available(c, ("eval",))
