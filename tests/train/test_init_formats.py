"""``config.init.checkpoint`` reads every format to the same variables: automl's TF1 checkpoint
(EMA or raw copies), its TF2 Keras checkpoint and its automl-named ``weights.npz`` agree; an effdet
state dict as ``.safetensors`` gives what the effdet converter gives; another run's workdir gives
its latest, best-AP or named step, EMA or raw copies. Only the plan is built (no compilation)."""

import tarfile

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file
from torch_refs import load_torch_reference
from train_helpers import tiny_config

from configs import d0
from effdet_jax.convert.effdet import load_effdet_state_dict
from effdet_jax.models.layout import model_groups, to_unrolled
from effdet_jax.train import checkpointing, experiment, initialization


@pytest.fixture(scope="module")
def d0_experiment():
    return experiment.build_experiment(d0.get_config())


def _plan(exp, spec, use_ema=True, config=None):
    config = (config or exp.config).copy_and_resolve_references()
    config.init.checkpoint = str(spec)
    config.init.use_ema = use_ema
    plan = initialization.plan(config, exp.model, exp.abstract_state)
    assert not plan.reinitialised and not plan.unused
    return plan


@pytest.mark.fullsize
def test_automl_tf1_tf2_and_npz_agree(automl_reference, d0_experiment, tmp_path):
    automl_reference.skip_unless_full("automl's TF checkpoints")
    for archive in ("d0/ckpt_tf1_ema.tar.xz", "d0/ckpt_tf2_save_weights.tar.xz"):
        with tarfile.open(automl_reference.root / archive) as tar:
            tar.extractall(tmp_path, filter="data")
    npz = _plan(d0_experiment, automl_reference.root / "d0/weights.npz")
    tf1 = _plan(d0_experiment, tmp_path / "efficientdet-d0")
    tf2 = _plan(d0_experiment, tmp_path / "d0-tf2/ckpt")  # a prefix, not the folder
    raw = _plan(d0_experiment, tmp_path / "efficientdet-d0", use_ema=False)
    assert "EMA copies" in tf1.source.description and "raw" in raw.source.description
    # automl's D0 has 676 variables; the stacked layout holds them in fewer leaves.
    unrolled = traverse_util.flatten_dict(to_unrolled(traverse_util.unflatten_dict(npz.loaded),
                                                      model_groups(d0_experiment.model.config)))
    assert len(unrolled) == 676 and len(npz.loaded) < 676
    for path, value in npz.loaded.items():
        assert np.array_equal(tf1.loaded[path], value), path
        assert np.array_equal(tf2.loaded[path], value), path
        # automl's raw copies hold 2x every non-kernel variable (see its README).
        factor = 1.0 if path[-1] == "kernel" else 2.0
        np.testing.assert_allclose(raw.loaded[path], factor * value, rtol=1e-6, err_msg=str(path))


@pytest.mark.torch_ref
def test_effdet_safetensors(d0_experiment, tmp_path):
    ref = load_torch_reference("effdet_models", "tf_efficientdet_d0/input")
    prefix = "tf_efficientdet_d0/sd/"
    sd = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
    save_file(sd, str(tmp_path / "d0.safetensors"))
    plan = _plan(d0_experiment, tmp_path / "d0.safetensors")
    assert plan.source.naming == "effdet"
    expected = traverse_util.flatten_dict(load_effdet_state_dict(sd, "efficientdet-d0"))
    assert plan.loaded.keys() == expected.keys()
    assert all(np.array_equal(plan.loaded[p], v) for p, v in expected.items())


def test_workdir_latest_best_and_step(tmp_path):
    config = tiny_config()
    exp = experiment.build_experiment(config)
    manager = checkpointing.make_manager(
        str(tmp_path / "run/checkpoints"),
        checkpointing.CheckpointOptions(every_steps=1, keep=5, keep_best=1, async_save=False))
    for step, ap in ((1, 0.5), (2, 0.2), (3, None)):
        state = jax.tree.map(lambda a, s=step: np.full(a.shape, s, a.dtype), exp.abstract_state)
        state = state.replace(ema_params=jax.tree.map(lambda x: x * 10, state.ema_params))
        checkpointing.save(manager, state, step, metrics=None if ap is None else {"AP": ap},
                           force=True)
    manager.close()
    stem = ("params", "backbone", "stem_conv", "kernel")
    run = tmp_path / "run"
    for spec, use_ema, value in ((run, True, 30), (f"{run}:best", True, 10), (f"{run}:2", True, 20),
                                 (f"{run}:2", False, 2)):
        plan = _plan(exp, spec, use_ema, config)
        assert np.all(plan.loaded[stem] == value), (spec, use_ema)
    with pytest.raises(initialization.InitError, match="no such step; the workdir has"):
        _plan(exp, f"{run}:7", True, config)
