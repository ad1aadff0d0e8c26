"""A non-finite loss stops the run naming the step and the part, and the last good checkpoint
stays intact; with ``nonfinite_policy="skip"`` the bad update is dropped and training goes on."""

import jax
import numpy as np
import pytest
from train_helpers import random_batch, tiny_config

from effdet_jax.train import batches, checkpointing, experiment, trainer

BAD_STEP = 3  # 1-based step whose batch holds a NaN image


@pytest.fixture
def nan_input(monkeypatch):
    """Replace the pipeline by random batches; the batch of step BAD_STEP has a NaN pixel."""

    def nan_batches(config, image_size, start_step=0):
        step = start_step
        while True:
            step += 1
            batch = random_batch(config.train.batch_size, image_size, config.model.num_classes,
                                 seed=step)
            if step == BAD_STEP:
                batch["images"][1, 5, 7, 0] = np.nan
            yield batch

    monkeypatch.setattr(batches, "train_batches", nan_batches)


def _config(policy: str):
    config = tiny_config(total_steps=5, nonfinite_policy=policy)
    config.checkpoint.every_steps = 1
    config.checkpoint.keep = 10
    return config


def _restore(config, workdir, step):
    exp = experiment.build_experiment(config)
    manager = trainer._checkpoint_manager(config, str(workdir))
    target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    restored = checkpointing.restore(manager, target, step)
    steps = manager.all_steps()
    manager.close()
    return jax.device_get(restored), steps


def test_nonfinite_loss_stops_naming_step_and_part(nan_input, tmp_path):
    config = _config("error")
    with pytest.raises(trainer.NonFiniteLossError, match=f"step {BAD_STEP}") as info:
        trainer.train_and_evaluate(config, str(tmp_path), evaluate_during_training=False)
    assert info.value.step == BAD_STEP
    assert "cls" in info.value.parts and "box" in info.value.parts
    assert "cls" in str(info.value)
    state, steps = _restore(config, tmp_path, BAD_STEP - 1)
    assert max(steps) == BAD_STEP - 1  # nothing saved at or after the bad step
    assert int(state.step) == BAD_STEP - 1
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


def test_skip_policy_drops_the_update(nan_input, tmp_path):
    config = _config("skip")
    trainer.train_and_evaluate(config, str(tmp_path), evaluate_during_training=False)
    before, steps = _restore(config, tmp_path, BAD_STEP - 1)
    after, _ = _restore(config, tmp_path, BAD_STEP)
    last, _ = _restore(config, tmp_path, 5)
    assert max(steps) == 5
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the NaN step changed nothing
    assert int(after.step) == BAD_STEP  # but the input position moved on
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(last.params))
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(after.params), jax.tree.leaves(last.params), strict=True)]
    assert any(changed)  # training resumed after the skipped step
