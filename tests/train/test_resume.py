"""kill -9 during training, restart: the run resumes from its last checkpoint (state, rng and
input position) and ends at exactly the params of an uninterrupted run."""

import os
import signal
import subprocess
import time

import pytest
from train_helpers import main_command, max_abs_diff, restore_state, subprocess_env, tiny_config

TOTAL, EVERY = 24, 4
OVERRIDES = (f"--config.train.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}")


def _committed_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def test_kill_dash_nine_then_resume_matches_uninterrupted(tmp_path):
    env = subprocess_env(2)
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(main_command(full, *OVERRIDES), env=env, check=True, capture_output=True)

    proc = subprocess.Popen(main_command(killed, *OVERRIDES), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(s >= 2 * EVERY for s in _committed_steps(killed)):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survived = _committed_steps(killed)
    assert max(survived) < TOTAL, survived

    resumed = subprocess.run(main_command(killed, *OVERRIDES), env=env, check=True,
                             capture_output=True, text=True)
    assert f"resumed from the checkpoint of step {max(survived)}" in resumed.stderr

    config = tiny_config()
    a = restore_state(config, full, TOTAL)
    b = restore_state(config, killed, TOTAL)
    assert int(a.step) == int(b.step) == TOTAL
    assert max_abs_diff(a.params, b.params) < 1e-6
    assert max_abs_diff(a.batch_stats, b.batch_stats) < 1e-6
    assert max_abs_diff(a.ema_params, b.ema_params) < 1e-6
    assert max_abs_diff(a.opt_state, b.opt_state) < 1e-6


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    env = subprocess_env(2)
    workdir = tmp_path / "run"
    overrides = ("--config.train.total_steps=400", f"--config.checkpoint.every_steps={EVERY}")
    proc = subprocess.Popen(main_command(workdir, *overrides), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _committed_steps(workdir):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert stopped, err[-2000:]
    step = int(stopped[0].rsplit(" ", 1)[1])
    assert step < 400 and step in _committed_steps(workdir)
