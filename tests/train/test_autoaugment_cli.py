"""``main.py`` with automl's AutoAugment: a run with ``--config.data.autoaugment_policy=v0``
trains (the policy's ops run inside the tf.data pipeline of the training batches) and a policy
automl does not have stops the run before anything is built, naming the allowed ones."""

import subprocess
import time

from train_helpers import ROOT, main_command, subprocess_env


def test_train_with_autoaugment_policy(tmp_path):
    cmd = main_command(tmp_path / "run", "--config.data.autoaugment_policy=v0",
                       "--config.train.total_steps=2", "--config.eval.num_summary_images=0")
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert any("] [2] " in line and "loss" in line for line in log.splitlines()), log[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_unknown_policy_fails_fast_naming_the_allowed_ones(tmp_path):
    cmd = main_command(tmp_path / "run", "--config.data.autoaugment_policy=v4")
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=120)
    elapsed = time.monotonic() - start
    log = run.stdout + run.stderr
    assert run.returncode != 0
    assert ("config.data.autoaugment_policy='v4' is invalid; allowed: "
            "('', 'v0', 'v1', 'v2', 'v3', 'randaug')") in log, log[-3000:]
    assert elapsed < 60, elapsed  # seconds of imports; no model is built
    assert not (tmp_path / "run" / "checkpoints").exists()
