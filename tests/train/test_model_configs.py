"""Every COCO config builds, shards and runs a train step at a reduced image size; at full size
it is only traced (``jax.eval_shape``) and its parameter count matches automl's published one."""

import importlib

import jax
import numpy as np
import pytest
from train_helpers import random_batch

from effdet_jax.train import experiment
from effdet_jax.train.config_validation import validate_config
from effdet_jax.train.train_step import TRAIN_KEYS

# automl README (efficientdet/README.md, "Pretrained EfficientDet Checkpoints"), millions of params.
PUBLISHED_PARAMS_M = {
    "d0": 3.9, "d1": 6.6, "d2": 8.1, "d3": 12.0, "d4": 20.7, "d5": 33.7, "d6": 51.9,
    "d7": 51.9, "d7x": 77.0,
}  # fmt: skip
# The smallest legal input: the coarsest level needs image_size >= 2**max_level.
REDUCED_SIZE = {"d7x": 256}


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


D7X_EXTRA = pytest.mark.xfail(
    strict=True,
    reason="model gives 77.147166M, 147,840 (= a 1x1 384->384 conv + bias) above automl's 77.0M; "
    "reported to the model owner",
)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=D7X_EXTRA) if n == "d7x" else n for n in PUBLISHED_PARAMS_M]
)
def test_full_size_param_count_matches_automl(name):
    config = _config(name)
    validate_config(config, num_devices=8)
    exp = experiment.build_experiment(config)  # traces init via eval_shape only
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
    assert count / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], abs=0.051)


@pytest.mark.parametrize(
    "name", ["d0"] + [pytest.param(n, marks=pytest.mark.slow) for n in list(PUBLISHED_PARAMS_M)[1:]]
)
def test_one_sharded_train_step_at_reduced_size(name):
    config = _config(name)
    config.model.image_size = REDUCED_SIZE.get(name, 128)
    config.train.batch_size = 8
    config.mesh.fsdp = True  # shard the large kernels along `data` as well
    config.mesh.shard_min_size = 2**16
    validate_config(config, num_devices=8)
    exp = experiment.build_experiment(config)
    state = exp.init_state()
    host = random_batch(8, exp.image_size, config.model.num_classes, seed=0)
    with jax.set_mesh(exp.mesh):
        batch = experiment.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
        state, metrics = exp.train_step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    assert int(state.step) == 1
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
    assert any("data" in spec for spec in specs)  # FSDP actually sharded something
