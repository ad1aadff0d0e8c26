import numpy as np
import pytest

from effdet_jax.data import label_map as lm


def test_coco_ids_are_the_80_official_ones():
    ids = lm.COCO_CATEGORY_IDS
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90
    # The 10 ids COCO never used (from the 2014 paper's 91-category list).
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert lm.COCO_CLASS_NAMES[ids.index(1)] == "person"
    assert lm.COCO_CLASS_NAMES[ids.index(90)] == "toothbrush"


def test_contiguous_and_coco90_spaces():
    c = lm.coco_label_map("contiguous")
    assert c.num_classes == 80
    assert c.label_of_category(90) == 79
    np.testing.assert_array_equal(c.category_of_labels([0, 11, 79]), [1, 13, 90])
    h = lm.coco_label_map("coco90")
    assert h.num_classes == 90
    assert h.label_of_category(90) == 89  # automl's head: logit = category_id - 1
    np.testing.assert_array_equal(h.category_of_labels([0, 12, 89]), [1, 13, 90])
    names = h.class_names()
    assert names[0] == "person" and names[11] == "class_11" and names[12] == "stop sign"
    with pytest.raises(KeyError):
        h.label_of_category(12)


def test_tfds_coco_table_and_json_categories():
    table = lm.tfds_label_to_category_table("coco/2017", 80)
    assert table[0] == 1 and table[79] == 90 and table[11] == 13
    np.testing.assert_array_equal(lm.tfds_label_to_category_table("voc/2007", 3), [1, 2, 3])
    m = lm.from_categories([{"id": 7, "name": "b"}, {"id": 3, "name": "a"}])
    assert m.category_ids == (3, 7) and m.names == ("a", "b") and m.label_of_category(7) == 1
    with pytest.raises(ValueError, match="coco90"):
        lm.from_categories([{"id": 100, "name": "x"}], "coco90")
