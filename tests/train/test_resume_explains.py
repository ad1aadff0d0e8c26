"""Resuming a workdir through ``main.py``, as a user does, when it cannot simply go on: the config
changed in an architecture key (stops within seconds, names the key, both values and the two ways
out, no traceback), an old workdir without ``config.json`` meets another architecture (one message
naming the variables and both shapes), and the latest checkpoint has a damaged data file (the run
resumes from the previous step, says so, and keeps the damaged one)."""

import json
import os
import shutil
import subprocess
import time

import pytest
from train_helpers import ROOT, main_command, subprocess_env

from effdet_jax.train import checkpointing, run_config

STEPS = 3  # the first run: a checkpoint after every step, all three kept
FIRST_RUN = (f"--config.train.total_steps={STEPS}", "--config.checkpoint.every_steps=1",
             "--config.checkpoint.keep=3")
# channel_attn has one fusion weight per input and channel, [inputs, C], where tiny's default
# (fastattn) has one per input, [inputs]: the same parameter names with other shapes.
CHANGED_ARCHITECTURE = "--config.model.fpn_weight_method=channel_attn"


def _run(workdir, *overrides: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(main_command(workdir, *overrides), cwd=ROOT, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def _steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir after a first run of ``STEPS`` steps with ``FIRST_RUN``'s checkpointing."""
    workdir = tmp_path_factory.mktemp("resume") / "first"
    proc, _ = _run(workdir, *FIRST_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(workdir) == [1, 2, 3]
    return workdir


def _copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def test_first_run_saves_its_resolved_config(trained):
    saved = json.loads((trained / run_config.CONFIG_FILE).read_text())
    # The model table's value for the unset placeholder, and the command line's overrides.
    assert saved["model"]["fpn_weight_method"] == "fastattn"
    assert saved["train"]["total_steps"] == STEPS
    assert saved["checkpoint"]["keep"] == 3


def test_changed_architecture_key_stops_within_seconds_naming_key_values_and_ways_out(
        trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    before = (workdir / run_config.CONFIG_FILE).read_text()
    proc, seconds = _run(workdir, *FIRST_RUN, CHANGED_ARCHITECTURE, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert "config.model.fpn_weight_method: saved 'fastattn', now 'channel_attn'" in out, out
    assert "--workdir=NEW_DIR" in out
    assert f"--config.init.checkpoint={workdir}" in out
    # Stopped before the model is built (the checkpoint manager, made right after, never was),
    # in seconds: the rest is Python, jax and TensorFlow imports (~8 s on an idle 2-core CPU).
    this_run_log = (workdir / "log.txt").read_text().rsplit("] command: ", 1)[-1]
    assert "checkpoint_manager.py" not in out + this_run_log
    assert seconds < 60, seconds
    assert _steps(workdir) == [1, 2, 3]
    assert (workdir / run_config.CONFIG_FILE).read_text() == before


def test_workdir_without_saved_config_names_variable_and_both_shapes(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    (workdir / run_config.CONFIG_FILE).unlink()  # a workdir from before config.json
    proc, _ = _run(workdir, *FIRST_RUN, CHANGED_ARCHITECTURE, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" not in out, out[-3000:]
    assert "params/fpn_cell_0/node_0_fusion: checkpoint (2,), model (2, 16)" in out, out[-3000:]
    assert f"--config.init.checkpoint={workdir}" in out
    assert _steps(workdir) == [1, 2, 3]


def test_damaged_latest_checkpoint_resumes_from_the_previous_one(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    state_dir = workdir / "checkpoints" / str(STEPS) / "state"
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    damaged = max(data_files, key=lambda p: p.stat().st_size)
    size = damaged.stat().st_size
    with open(damaged, "r+b") as f:
        f.truncate(size // 2)

    # One more step than the first run: an allowed change, logged.
    proc, _ = _run(workdir, *FIRST_RUN[1:], f"--config.train.total_steps={STEPS + 1}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"checkpoint step {STEPS} ({workdir}/checkpoints/{STEPS}) cannot be restored" in out
    assert f"file {damaged}" in out, out[-3000:]  # found through the OCDBT index
    assert f"resumed from the checkpoint of step {STEPS - 1}" in out
    damaged_dir = f"{workdir}/checkpoints{checkpointing.DAMAGED_SUFFIX}/{STEPS}"
    assert f"checkpoint step {STEPS} moved to {damaged_dir} (kept, not deleted)" in out
    assert f"resuming with config.train.total_steps changed: {STEPS} -> {STEPS + 1}" in out
    # Trained on to the end, and the damaged step kept for inspection, unchanged.
    assert _steps(workdir) == [STEPS - 1, STEPS, STEPS + 1]
    meta = json.loads((workdir / "checkpoints" / str(STEPS + 1) / "meta" / "metadata").read_text())
    assert meta["step"] == STEPS + 1
    aside = workdir / f"checkpoints{checkpointing.DAMAGED_SUFFIX}" / str(STEPS) / damaged.relative_to(
        workdir / "checkpoints" / str(STEPS))
    assert aside.stat().st_size == size // 2


def test_policy_sorts_keys_by_what_they_change():
    from train_helpers import tiny_config

    saved = run_config.resolved(tiny_config())
    config = tiny_config()
    config.model.fpn_weight_method = "fastattn"  # the model table's value: no difference
    config.model.overrides.fpn_num_filters = 8
    config.model.overrides.cpu_kernels = "off"
    config.model.image_size = 128
    config.train.learning_rate = 0.01
    config.eval.every_steps = 3
    config.xla_cpu_opt_preset = "default"
    found = run_config.differences(saved, run_config.resolved(config))
    assert found[run_config.MUST_MATCH] == [("model.overrides.fpn_num_filters", 16, 8)]
    assert [k for k, *_ in found[run_config.LOGGED]] == [
        "data.shapes.image_size", "model.image_size", "train.learning_rate"]
    assert [k for k, *_ in found[run_config.FREE]] == [
        "eval.every_steps", "model.overrides.cpu_kernels", "xla_cpu_opt_preset"]


def test_no_readable_checkpoint_is_an_error_listing_each_step_moving_none(trained, tmp_path):
    from train_helpers import tiny_config

    from effdet_jax.train import experiment

    workdir = _copy(trained, tmp_path)
    for step in (1, 2, 3):
        (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").write_bytes(b"damaged")
    exp = experiment.build_experiment(tiny_config())
    target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    options = checkpointing.CheckpointOptions(every_steps=1, keep=3)
    manager = checkpointing.make_manager(str(workdir / "checkpoints"), options)
    with pytest.raises(checkpointing.CheckpointRestoreError) as error:
        checkpointing.restore_latest(manager, target)
    manager.close()
    message = str(error.value)
    for step in (3, 2, 1):
        assert f"step {step} ({workdir}/checkpoints/{step}) cannot be restored" in message
        assert f"file {workdir}/checkpoints/{step}/state/manifest.ocdbt" in message
    # Nothing moved: a restart must not begin from scratch beside them.
    assert _steps(workdir) == [1, 2, 3]
    assert not (workdir / f"checkpoints{checkpointing.DAMAGED_SUFFIX}").exists()
