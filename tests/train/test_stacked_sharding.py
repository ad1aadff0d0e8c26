"""FSDP / model sharding of stacked variables (``models/layout.py``): the repeat axis of a scanned
module is never the sharded axis, and the rest of a stacked leaf is sharded as one repeat of the
unrolled layout would be (``mesh.array_spec`` of the unstacked shape)."""

import jax
from train_helpers import tiny_config

from effdet_jax.models.layout import is_stacked_path
from effdet_jax.train import experiment
from effdet_jax.train import mesh as mesh_lib


def test_repeat_axis_is_never_sharded_and_the_rest_follows_the_unrolled_rule():
    config = tiny_config()
    # Stages of 2-3 blocks and 3 BiFPN cells: stacks of 1-2 repeats, the sizes a shard count
    # (data=4, model=2) could pick by accident.
    config.model.overrides.backbone_overrides.depth_coefficient = 1.0
    config.model.overrides.fpn_cell_repeats = 3
    config.mesh.data, config.mesh.model, config.mesh.fsdp, config.mesh.shard_min_size = 4, 2, True, 1
    devices = jax.devices()[:8]
    exp = experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, devices))
    leaves = jax.tree_util.tree_flatten_with_path(exp.abstract_state)[0]
    specs = jax.tree.leaves(exp.state_shardings, is_leaf=lambda s: hasattr(s, "spec"))
    stacked = 0
    for (path, leaf), sharding in zip(leaves, specs, strict=True):
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if not is_stacked_path(names):
            continue
        stacked += 1
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        assert spec[0] is None, ("/".join(names), leaf.shape, spec)
        unrolled = mesh_lib.array_spec(leaf.shape[1:], exp.mesh, True, 1)
        assert spec[1:] == tuple(unrolled) + (None,) * (len(leaf.shape) - 1 - len(unrolled)), names
    assert stacked > 100  # params, EMA copies and optimizer moments of every stacked module
