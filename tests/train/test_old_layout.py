"""A workdir written before the scanned blocks (every backbone block its own ``block_<i>``) meets
this version, as a user meets it: ``main.py --mode=eval`` on it stops before compiling, saying it is
the pre-scan layout and how to go on; going on that way (``--config.init.checkpoint=OLD_WORKDIR``)
evaluates, with the old weights stacked exactly (``layout.to_stacked`` of the unrolled tree)."""

import subprocess
import time

import jax
import numpy as np
from flax import serialization, traverse_util
from train_helpers import ROOT, main_command, subprocess_env, tiny_config

from effdet_jax.models.layout import model_groups, to_unrolled
from effdet_jax.train import checkpointing, experiment, initialization, run_config
from effdet_jax.train import mesh as mesh_lib

# tiny's backbone at half depth: stages of 2 blocks, so each has a stacked module.
DEPTH = "--config.model.overrides.backbone_overrides.depth_coefficient=0.5"


def _config():
    config = tiny_config()
    config.model.overrides.backbone_overrides.depth_coefficient = 0.5
    config.mesh.data, config.mesh.model = 1, 1
    return config


def _eval_command(workdir, *overrides):
    return [("--mode=eval" if arg == "--mode=train" else arg)
            for arg in main_command(workdir, *overrides)]


def _unrolled_tree(tree, groups):
    """Every model-variable subtree (a dict holding ``backbone``) of ``tree`` in the unrolled layout."""
    if not isinstance(tree, dict):
        return tree
    if "backbone" in tree:
        return to_unrolled({"c": tree}, groups)["c"]
    return {k: _unrolled_tree(v, groups) for k, v in tree.items()}


def _write_old_workdir(workdir, heads_only=False):
    """A workdir whose checkpoint is in the unrolled layout; ``heads_only``: only the heads' repeats
    unrolled (backbone and BiFPN stacked), the layout before the heads' scan."""
    config = _config()
    exp = experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype)
        if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype),
        exp.abstract_state)
    groups = model_groups(exp.model.config)
    assert groups, "the test model must have stacked blocks"
    if heads_only:
        groups = [g for g in groups if g.parent in (("class_net",), ("box_net",))]
    old = _unrolled_tree(serialization.to_state_dict(state), groups)
    assert "conv_0" in old["params"]["class_net"] and "bn_0_p5" in old["ema_batch_stats"]["box_net"]
    if heads_only:
        assert "blocks_4_to_4" in old["params"]["backbone"]
    else:
        assert "block_4" in old["params"]["backbone"] and "block_4" in old["ema_params"]["backbone"]
    run_config.check_and_save(config, str(workdir))
    manager = checkpointing.make_manager(
        str(workdir / "checkpoints"), checkpointing.CheckpointOptions(every_steps=1, keep=1, keep_best=0))
    checkpointing.save(manager, old, step=1, force=True)
    manager.wait_until_finished()
    manager.close()
    return config, state



def _assert_init_checkpoint_loads_its_ema_weights(config, state, old_workdir) -> None:
    """``config.init.checkpoint=old_workdir`` loads, stacked, exactly the old run's EMA weights."""
    config.init.checkpoint = str(old_workdir)
    exp = experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    plan = initialization.plan(config, exp.model, exp.abstract_state)
    expected = traverse_util.flatten_dict(
        {"params": serialization.to_state_dict(state.ema_params),
         "batch_stats": serialization.to_state_dict(state.ema_batch_stats)})
    assert set(plan.loaded) == set(expected) and not plan.reinitialised
    for path, value in expected.items():
        np.testing.assert_array_equal(plan.loaded[path], value, err_msg="/".join(path))

def test_old_layout_workdir_fails_before_compiling_and_its_weights_convert(tmp_path):
    old_workdir = tmp_path / "old"
    config, state = _write_old_workdir(old_workdir)

    start = time.monotonic()
    proc = subprocess.run(_eval_command(old_workdir, DEPTH), cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert "is in the pre-scan parameter layout" in out, out[-3000:]
    assert "backbone/blocks_4_to_4" in out
    assert f"--config.init.checkpoint={old_workdir}" in out
    # Before any compile: ~10 s of imports on an idle 2-core CPU; the bar allows a loaded machine.
    assert "Compiling" not in out and seconds < 300, seconds

    # The way out the message names: its weights, stacked, are exactly the old run's EMA weights.
    _assert_init_checkpoint_loads_its_ema_weights(config, state, old_workdir)

    proc = subprocess.run(
        _eval_command(tmp_path / "new", DEPTH, f"--config.init.checkpoint={old_workdir}"),
        cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "AP" in out, out[-3000:]


def test_workdir_with_unrolled_heads_fails_before_compiling_and_its_weights_convert(tmp_path):
    # Backbone and BiFPN stacked, each head repeat its own conv_<r> / bn_<r>_p<l>.
    old_workdir = tmp_path / "old"
    config, state = _write_old_workdir(old_workdir, heads_only=True)
    proc = subprocess.run(_eval_command(old_workdir, DEPTH), cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert "is in the pre-scan parameter layout" in out, out[-3000:]
    assert "box_net/repeats_0_to_0" in out and "class_net/repeats_0_to_0" in out, out[-3000:]
    assert f"--config.init.checkpoint={old_workdir}" in out
    assert "Compiling" not in out

    _assert_init_checkpoint_loads_its_ema_weights(config, state, old_workdir)
