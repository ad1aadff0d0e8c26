"""``config.init.backbone`` from a timm ``tf_efficientnet_b0`` state dict (``.safetensors``): the
new state's backbone gives timm's features (strides 8, 16, 32: the P3-P5 inputs) within 1e-4 of
their scale, its EMA copies equal it, the BiFPN and heads keep their fresh initialisation, and the
table lists timm's classifier layers as unused."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from torch_refs import load_torch_reference
from train_helpers import tiny_config

from effdet_jax.models.efficientnet import EfficientNet
from effdet_jax.train import experiment, initialization

TIMM = "tf_efficientnet_b0"


@pytest.mark.torch_ref
def test_backbone_from_timm_state_dict_gives_timm_features(tmp_path):
    ref = load_torch_reference("timm_efficientnet", f"{TIMM}/features_8")
    prefix = f"{TIMM}/sd/"
    path = tmp_path / f"{TIMM}.safetensors"
    save_file({k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}, str(path))

    config = tiny_config()
    # configs/tiny.py's thin BiFPN and heads on the full B0 backbone.
    config.model.overrides = ml_collections.ConfigDict(
        {"fpn_num_filters": 16, "fpn_cell_repeats": 1, "box_class_repeats": 1, "max_level": 5})
    config.init.backbone = str(path)
    exp = experiment.build_experiment(config)
    plan = initialization.plan(config, exp.model, exp.abstract_state)
    table = plan.table()
    assert "unused          classifier.weight" in table and "conv_head.weight" in table
    assert not any(p[1] == "backbone" for p in plan.reinitialised)

    state = initialization.initial_state(exp)
    fresh = exp.init_state()
    flat, flat_fresh = (traverse_util.flatten_dict(jax.device_get(s.params)) for s in (state, fresh))
    for p in flat:
        if p[0] != "backbone":
            assert np.array_equal(flat[p], flat_fresh[p]), p  # BiFPN and heads: fresh init
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.params),
                                     jax.device_get(state.ema_params)))

    backbone = EfficientNet(exp.model.config.backbone_config(), features_only=True)
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    endpoints = jax.jit(backbone.apply)(variables, ref[f"{TIMM}/input"])
    for stride in (8, 16, 32):
        expected = ref[f"{TIMM}/features_{stride}"]
        got = np.asarray(endpoints[stride])
        assert got.shape == expected.shape, stride
        err = np.abs(got - expected).max()
        assert err <= 1e-4 * np.abs(expected).max(), (stride, err)
