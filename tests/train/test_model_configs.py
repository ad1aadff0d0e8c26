"""Every COCO config builds and shards at full size (traced only) and runs one sharded train step
at a reduced image size.

Compiling a full B1-B7 train step costs XLA:CPU many minutes and d7x's more memory than the 2-core
CI machine has (compile times and memory in benchmarks/RESULTS.md), so the default suite runs the
step of d0's config with a thin model (``THIN``) and lowers (traces and shards, no compile) d1, d4
and d7x; ``-m slow`` (``make test-all``) runs the step of every config, d0 included. On a one-GPU
machine the same tests run over a one-device mesh."""

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import random_batch

import effdet_jax
from effdet_jax.models.efficientnet import count_params
from effdet_jax.train import batches, experiment
from effdet_jax.train.config_validation import validate_config
from effdet_jax.train.train_step import TRAIN_KEYS

NAMES = ("d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d7x")
# configs/d0.py (its optimizer, loss, EMA and sharding rules) with configs/tiny.py's thin model at
# 64 px: the default suite's sharded train step; the full-width d0 step (minutes of XLA:CPU compile
# on 2 cores) runs with the slow tests.
THIN = "d0_thin"
# The smallest legal input for P8; tiny's P3-P5 model at tiny's size.
REDUCED_SIZE = {"d7x": 256, THIN: 64}


def _config(name: str):
    if name == THIN:
        from configs import tiny

        config = _config("d0")
        config.model.overrides = tiny.get_config().model.overrides
        return config
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
    # The thin model's largest kernels have ~10**4 elements: a lower threshold still shards them.
    config.mesh.shard_min_size = 2**10 if name == THIN else 2**16
    # 8 simulated CPU devices here (conftest); one device where the slow steps run on a GPU.
    validate_config(config, num_devices=jax.device_count())
    return config


# d1 (first scaled backbone), d4 and d7x (sum fusion, P8): lowered in the default suite.
LOWERED = ("d1", "d4", "d7x")


@pytest.mark.parametrize("name", LOWERED)
def test_sharded_train_step_lowers_at_reduced_size(name):
    """Build, shard and lower the real train step (tracing with the shardings)."""
    config = _reduced(name)
    exp = experiment.build_experiment(config)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        exp.abstract_state, exp.state_shardings,
    )
    host = random_batch(8, exp.image_size, config.model.num_classes, seed=0)
    with jax.set_mesh(exp.mesh):
        batch = batches.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
        lowered = exp.train_step.lower(state, batch)
    # FSDP put large kernels along `data`, and the batch enters split 8 ways along it.
    specs = [leaf.spec for leaf in jax.tree.leaves(exp.state_shardings)]
    assert any("data" in spec for spec in specs)
    images_arg = r'tensor<8x\d+x\d+x3xf32> \{sdy\.sharding = #sdy\.sharding<@mesh, \[\{"data"\}'
    assert re.search(images_arg, lowered.as_text())


# Only for the slow runs of the big configs: LLVM's cheapest settings cut the compile by about a
# third, and one step at 128 px runs in seconds either way.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.mark.parametrize(
    "name", [THIN, *(pytest.param(n, marks=pytest.mark.slow) for n in NAMES)]
)
def test_one_sharded_train_step_at_reduced_size(name):
    """The config's own model, optimizer and loss, FSDP-sharded over 8 devices: one step runs,
    its loss is finite, and the parameters move."""
    config = _reduced(name)
    if name not in ("d0", THIN):  # XLA's plain ops (the GPU/TPU program): half the CPU compile time
        config.model.overrides.cpu_kernels = "off"
    exp = experiment.build_experiment(config)
    state = exp.init_state()
    before = jax.device_get(state.params)
    host = random_batch(8, exp.image_size, config.model.num_classes, seed=0)
    with jax.set_mesh(exp.mesh):
        batch = batches.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
        if name in ("d0", THIN):
            step = exp.train_step
        else:
            options = FAST_COMPILE if jax.default_backend() == "cpu" else None
            step = exp.train_step.lower(state, batch).compile(options)
        state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    assert int(state.step) == 1
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.params, before)
    assert max(jax.tree.leaves(moved)) > 0
    if exp.mesh.shape["data"] > 1:  # FSDP actually sharded something (nothing to shard on 1 GPU)
        specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.params)]
        assert any("data" in spec for spec in specs)
