"""The tfds path, on tfds' own mock data (random images and objects, no download)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from effdet_jax.data.pipeline import make_eval_pipeline, make_train_pipeline
from effdet_jax.data.sources.tfds import DatasetNotPreparedError
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

from ..helpers import take, tiny_shapes_config

S = 64


def _config(name, tmp_path, **kw):
    c = tiny_shapes_config(source="tfds", tfds_name=name, tfds_data_dir=str(tmp_path), **kw)
    c.eval_split = "validation" if name.startswith("coco") else "test"
    return c


@pytest.mark.parametrize("label_space", ["contiguous", "coco90"])
def test_coco_mock_train_and_eval(tmp_path, label_space):
    c = _config("coco/2017", tmp_path, label_space=label_space)
    with tfds.testing.mock_data(num_examples=6):
        train = make_train_pipeline(c, S, 2, normalization=IMAGENET)
        batch = take(train, 2)[1]
        evals = make_eval_pipeline(c, S, 4, normalization=IMAGENET)
        eval_batches = list(evals)
    assert train.label_map.num_classes == (80 if label_space == "contiguous" else 90)
    assert train.label_map.names[0] == "person"
    assert batch["images"].shape == (2, S, S, 3)
    valid = batch["classes"] >= 0
    assert valid.any()
    assert batch["classes"][valid].max() < train.label_map.num_classes
    boxes = batch["boxes"][valid]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes >= 0).all() and (boxes <= S).all()
    assert evals.num_batches == len(eval_batches) == 2
    ids = np.concatenate([b["image_id"] for b in eval_batches])
    assert (ids[:6] >= 0).all() and (ids[6:] == -1).all()


def test_voc_mock(tmp_path):
    # (tfds' mock ignores split slicing, so per-process shards are not observable here; the
    # source asks tfds for ``tfds.even_splits(split, n)[i]``.)
    c = _config("voc/2007", tmp_path)
    with tfds.testing.mock_data(num_examples=5):
        p = make_eval_pipeline(c, S, 2, normalization=IMAGENET)
        batches = list(p)
    assert p.label_map.num_classes == 20 and p.label_map.category_ids[0] == 1
    assert p.label_map.names[0] == "aeroplane"
    ids = np.concatenate([b["image_id"] for b in batches])
    assert len(ids) == 6 and (ids[:5] >= 0).all() and ids[5] == -1
    assert len(set(ids[:5].tolist())) == 5  # hashed file names are distinct


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    c = _config("coco/2017", tmp_path)
    with pytest.raises(DatasetNotPreparedError) as e:
        make_train_pipeline(c, S, 2, normalization=IMAGENET)
    assert f"tfds build coco/2017 --data_dir={tmp_path}" in str(e.value)
