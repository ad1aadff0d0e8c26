import numpy as np
import pytest

from effdet_jax.data.counts import COUNT_KEYS
from effdet_jax.data.pipeline import make_eval_pipeline, make_train_pipeline, split_counts
from effdet_jax.models.model_config import IMAGENET_NORMALIZATION as IMAGENET

from .helpers import take, tiny_shapes_config, valid_rows

S, B = 64, 4


def test_train_batch_layout():
    c = tiny_shapes_config()
    p = make_train_pipeline(c, S, B, normalization=IMAGENET)
    assert p.label_map.num_classes == 4 and p.num_batches is None and p.num_examples == 12
    (batch,) = take(p, 1)
    arrays, counts = split_counts(batch)
    assert arrays["images"].shape == (B, S, S, 3) and arrays["images"].dtype == np.float32
    assert arrays["boxes"].shape == (B, 100, 4) and arrays["boxes"].dtype == np.float32
    assert arrays["classes"].shape == (B, 100) and arrays["classes"].dtype == np.int32
    assert arrays["image_id"].dtype == np.int64 and arrays["image_scale"].dtype == np.float32
    assert set(counts) == set(COUNT_KEYS)
    for b in range(B):
        boxes, classes = valid_rows(batch, b)
        assert ((classes >= 0) & (classes < 4)).all()
        assert (boxes >= 0).all() and (boxes <= S).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (batch["boxes"][b][batch["classes"][b] == -1] == -1).all()


def test_same_seed_same_batches_and_resume_at_step():
    c = tiny_shapes_config()
    # Crosses two epochs (12 examples, B=4).
    first = take(make_train_pipeline(c, S, B, normalization=IMAGENET), 7)
    again = take(make_train_pipeline(c, S, B, normalization=IMAGENET), 7)
    resumed = take(make_train_pipeline(c, S, B, start_step=4, normalization=IMAGENET), 3)
    for x, y in zip(first, again, strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
    for x, y in zip(first[4:], resumed, strict=True):
        for k in ("images", "boxes", "classes", "image_id", "image_scale"):
            np.testing.assert_array_equal(x[k], y[k])
    # Every epoch visits each example once, in a different order.
    epoch0 = np.concatenate([b["image_id"] for b in first[:3]])
    epoch1 = np.concatenate([b["image_id"] for b in first[3:6]])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert list(epoch0) != list(epoch1)
    c.seed = 1
    other = take(make_train_pipeline(c, S, B, normalization=IMAGENET), 1)[0]
    assert not np.array_equal(other["images"], first[0]["images"])


def test_processes_read_disjoint_shards():
    c = tiny_shapes_config()
    ids = []
    for i in range(3):
        p = make_train_pipeline(c, S, 2, process_index=i, process_count=3, normalization=IMAGENET)
        assert p.num_examples == 4
        ids.append(set(np.concatenate([b["image_id"] for b in take(p, 2)])))
    assert set.union(*ids) == set(range(12)) and sum(len(x) for x in ids) == 12


def test_eval_is_ordered_padded_and_same_length_on_every_process():
    c = tiny_shapes_config()
    p = make_eval_pipeline(c, S, B, normalization=IMAGENET)
    batches = list(p)
    assert p.num_batches == len(batches) == 2
    ids = np.concatenate([b["image_id"] for b in batches])
    np.testing.assert_array_equal(ids, [10_000_000 + i for i in range(5)] + [-1, -1, -1])
    assert sum(b["counts"]["padding_examples"] for b in batches) == 3
    assert "crowd_classes" in batches[0]
    lengths = {len(list(make_eval_pipeline(c, S, 2, process_index=i, process_count=2,
                                           normalization=IMAGENET)))
               for i in range(2)}
    assert lengths == {2}  # 5 examples over 2 processes: shards of 3 and 2 -> 2 batches each


def test_more_boxes_than_max_keeps_first_and_counts():
    c = tiny_shapes_config(max_instances_per_image=2)
    c.shapes.min_objects = 5
    c.shapes.max_objects = 6
    batch = take(make_eval_pipeline(c, S, B, normalization=IMAGENET), 1)[0]
    assert batch["boxes"].shape == (B, 2, 4)
    assert batch["counts"]["boxes_over_max_dropped"] >= B * 3


def test_config_is_validated():
    c = tiny_shapes_config()
    c.source = "nope"
    with pytest.raises(ValueError, match="config.data.source='nope'"):
        make_train_pipeline(c, S, B, normalization=IMAGENET)
