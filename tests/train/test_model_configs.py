"""Every COCO config builds and shards at full size (traced only) and at a reduced image size (d0
runs a train step; d1..d7x lower the sharded step)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import random_batch

import effdet_jax
from effdet_jax.models.efficientnet import count_params
from effdet_jax.train import experiment
from effdet_jax.train.config_validation import validate_config
from effdet_jax.train.train_step import TRAIN_KEYS

NAMES = ("d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x")
# The smallest legal input for P8.
REDUCED_SIZE = {"d7x": 256}


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", NAMES)
def test_full_size_config_builds_the_model_table_entry(name):
    """At full size the config only traces (eval_shape); its model is the table's (whose parameter
    counts tests/models checks against automl to the unit)."""
    config = _config(name)
    validate_config(config, num_devices=8)
    exp = experiment.build_experiment(config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
    assert config.model.name == f"efficientdet-{name}"
    model = effdet_jax.efficientdet(config.model.name, image_size=128)
    table = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    assert count == count_params(table)


def _reduced(name: str):
    config = _config(name)
    config.model.image_size = REDUCED_SIZE.get(name, 128)
    config.train.batch_size = 8
    config.mesh.fsdp = True  # shard the large kernels along `data` as well
    config.mesh.shard_min_size = 2**16
    validate_config(config, num_devices=8)
    return config


# d1 (first scaled backbone), d4 and d7x (sum fusion, P8) by default; the rest with `-m slow`.
LOWERED = [n if n in ("d1", "d4", "d7x") else pytest.param(n, marks=pytest.mark.slow) for n in NAMES[1:]]


@pytest.mark.parametrize("name", LOWERED)
def test_sharded_train_step_lowers_at_reduced_size(name):
    """d1..d7x: build, shard and lower the real train step (tracing with the shardings; XLA's
    compile of a full B1-B7 step costs minutes on 2 cores, so only d0 runs below)."""
    config = _reduced(name)
    exp = experiment.build_experiment(config)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        exp.abstract_state, exp.state_shardings,
    )
    host = random_batch(8, exp.image_size, config.model.num_classes, seed=0)
    with jax.set_mesh(exp.mesh):
        batch = experiment.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
        lowered = exp.train_step.lower(state, batch)
    assert "all-reduce" in lowered.as_text() or "sharding" in lowered.as_text()


def test_one_sharded_train_step_at_reduced_size():
    config = _reduced("d0")
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
