"""The same 3 training steps on 1 device, an 8-device data mesh and a 4x2 data x model mesh (with
FSDP) give the same losses, params and batch statistics; BN statistics are global-batch ones."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from train_helpers import max_abs_diff, random_batch, tiny_config

from effdet_jax.train import batches, experiment
from effdet_jax.train import mesh as mesh_lib
from effdet_jax.train.train_step import TRAIN_KEYS

NUM_STEPS = 3


def _run(devices, data: int, model: int, fsdp: bool, cpu_kernels: str = "auto"):
    config = tiny_config()
    config.mesh.data, config.mesh.model, config.mesh.fsdp = data, model, fsdp
    config.model.overrides.cpu_kernels = cpu_kernels
    exp = experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, devices))
    state = exp.init_state()
    init = jax.device_get(state)
    losses, stats_after_first = [], None
    with jax.set_mesh(exp.mesh):
        for step in range(NUM_STEPS):
            host = random_batch(8, exp.image_size, config.model.num_classes, seed=step)
            batch = batches.host_batch_to_global(host, exp.batch_sharding, TRAIN_KEYS)
            state, metrics = exp.train_step(state, batch)
            losses.append(float(metrics["loss"]))
            if step == 0:
                stats_after_first = jax.device_get(state.batch_stats)
    return {
        "exp": exp,
        "init": init,
        "final": jax.device_get(state),
        "specs": jax.tree.map(lambda a: a.sharding.spec, state.params),
        "losses": np.array(losses),
        "stats_after_first": stats_after_first,
    }


@pytest.fixture(scope="module")
def runs():
    devices = jax.devices()
    assert len(devices) == 8, "tests/conftest.py must request 8 CPU devices"
    return {
        "single": _run(devices[:1], 1, 1, False),
        "data8": _run(devices, 8, 1, False),
        "data4_model2_fsdp": _run(devices, 4, 2, True),
        # XLA's plain ops (the GPU/TPU program): autodiff of the grouped convolution gives a
        # kernel gradient 2x too large on this mesh; ops.depthwise.depthwise_lax's must not.
        "data4_model2_fsdp_lax": _run(devices, 4, 2, True, cpu_kernels="off"),
    }


@pytest.mark.parametrize("name", ["data8", "data4_model2_fsdp", "data4_model2_fsdp_lax"])
def test_meshes_match_single_device(runs, name):
    ref, run = runs["single"], runs[name]
    assert np.all(np.isfinite(ref["losses"]))
    assert ref["losses"][-1] != ref["losses"][0]  # it trains
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5, atol=1e-5)
    assert max_abs_diff(run["final"].params, ref["final"].params) < 1e-5
    assert max_abs_diff(run["final"].batch_stats, ref["final"].batch_stats) < 1e-5
    assert max_abs_diff(run["final"].ema_params, ref["final"].ema_params) < 1e-5
    assert int(run["final"].step) == NUM_STEPS


def test_large_params_are_actually_sharded(runs):
    specs = jax.tree.leaves(runs["data4_model2_fsdp"]["specs"], is_leaf=lambda s: isinstance(
        s, PartitionSpec))
    used = {axis for spec in specs for axis in spec if axis is not None}
    assert used == {"data", "model"}, used


def test_bn_statistics_are_over_the_global_batch(runs):
    """After one step on 8 devices the BN moving stats equal an un-sharded full-batch update, and
    clearly differ from what one device's shard alone would give (no per-device BN)."""
    run = runs["data8"]
    exp, init = run["exp"], run["init"]
    host = random_batch(8, exp.image_size, exp.config.model.num_classes, seed=0)
    rng = jax.random.fold_in(init.rng, 0)

    def stats_of(images):
        _, updates = exp.model.apply(
            {"params": init.params, "batch_stats": init.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": rng},
        )
        return jax.device_get(updates["batch_stats"])

    with jax.default_device(jax.devices()[0]):
        full = stats_of(host["images"])
        shard = stats_of(host["images"][:1])
    assert max_abs_diff(run["stats_after_first"], full) < 1e-5
    assert max_abs_diff(run["stats_after_first"], shard) > 1e-3
