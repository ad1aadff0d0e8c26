import pytest

from effdet_jax.data.config import default_data_config, validate_data_config


def test_defaults_are_valid_and_documented():
    c = default_data_config()
    validate_data_config(c)
    doc = default_data_config.__doc__
    for key in c.keys():
        assert key.split("_")[0] in doc, key


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("source", "kitti", "config.data.source='kitti' is invalid; allowed: ('shapes', 'tfds'"),
        ("label_space", "coco91", "allowed: ('contiguous', 'coco90')"),
        ("autoaugment_policy", "v4", "config.data.autoaugment_policy='v4'"),
        ("jitter_min", 3.0, "0 < jitter_min <= jitter_max (2.0)"),
        ("max_instances_per_image", 0, "config.data.max_instances_per_image=0"),
        ("num_parallel_calls", 0, "-1 (AUTOTUNE) or >= 1"),
    ],
)
def test_bad_values_name_key_and_allowed(key, value, fragment):
    c = default_data_config()
    c[key] = value
    with pytest.raises(ValueError) as e:
        validate_data_config(c)
    assert fragment in str(e.value)


def test_unknown_key_is_named():
    c = default_data_config()
    c.shufle_buffer = 3  # typo
    with pytest.raises(ValueError, match=r"config.data.shufle_buffer=3 is invalid; allowed: keys"):
        validate_data_config(c)


def test_coco_json_needs_paths_and_shapes_seeds_differ():
    c = default_data_config()
    c.source = "coco_json"
    with pytest.raises(ValueError, match="train_annotations=''.*required when source='coco_json'"):
        validate_data_config(c)
    c = default_data_config()
    c.shapes.eval_seed = c.shapes.train_seed
    with pytest.raises(ValueError, match="shapes.eval_seed"):
        validate_data_config(c)


def test_autoaugment_policies_are_automls_and_randaug_takes_no_extra_layers():
    c = default_data_config()
    for policy in ("", "v0", "v1", "v2", "v3", "randaug"):
        c.autoaugment_policy = policy
        validate_data_config(c)
    c.autoaugment_policy = "v4"
    with pytest.raises(ValueError, match=r"allowed: \('', 'v0', 'v1', 'v2', 'v3', 'randaug'\)"):
        validate_data_config(c)
    c.autoaugment_policy = "randaug"
    c.randaugment_layers = 2
    with pytest.raises(ValueError, match="randaugment_layers=2 is invalid; allowed: 0 with "
                                         "autoaugment_policy='randaug'"):
        validate_data_config(c)
    c.autoaugment_policy = ""
    c.randaugment_magnitude = 15  # automl's RandAugment magnitude
    validate_data_config(c)
    c.randaugment_magnitude = 31
    with pytest.raises(ValueError, match="randaugment_magnitude=31 is invalid; allowed: 0..30"):
        validate_data_config(c)
