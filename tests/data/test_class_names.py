"""Class names for predict come from the label space alone: COCO's names in the 90-slot layout
(logit = category id - 1, gaps unnamed), a COCO json's categories without its images."""

import json

from effdet_jax.data.class_names import label_names
from effdet_jax.data.config import default_data_config
from effdet_jax.data.label_map import COCO_CATEGORY_IDS, COCO_CLASS_NAMES


def test_coco90_names_without_the_dataset():
    config = default_data_config()
    config.source, config.tfds_name, config.label_space = "tfds", "coco/2017", "coco90"
    config.tfds_data_dir = "/nonexistent"  # nothing is read
    names = label_names(config, 90)
    assert len(names) == 90
    for cid, name in zip(COCO_CATEGORY_IDS, COCO_CLASS_NAMES, strict=True):
        assert names[cid - 1] == name
    assert names[0] == "person" and names[89] == "toothbrush" and names[11] == "class_11"


def test_coco_json_categories_without_images(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": 9, "name": "bird"}, {"id": 3, "name": "cat"}]}))
    config = default_data_config()
    config.source = "coco_json"
    config.train_annotations = config.eval_annotations = str(path)
    config.train_images = config.eval_images = str(tmp_path / "no_such_folder")
    assert label_names(config, 2) == ("cat", "bird")  # contiguous: sorted by id
    config.label_space = "coco90"
    names = label_names(config, 90)
    assert names[2] == "cat" and names[8] == "bird" and names[0] == "class_0"
