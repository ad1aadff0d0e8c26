"""The persistent compilation cache of ``main.py``: on by default, a restart compiles nothing.

The workflow test runs ``main.py`` on ``configs/tiny.py`` twice against a fresh cache folder
(``$EFFDET_JAX_COMPILATION_CACHE``): the first run compiles its train step and writes it to the
folder, the resumed second run loads it and says so.
"""

import pathlib
import subprocess

import pytest
from train_helpers import main_command, subprocess_env

from effdet_jax.train import compile_cache


def _run_text(proc: subprocess.CompletedProcess, workdir: pathlib.Path) -> str:
    """What a user can read of a run: its console and any log file it wrote in the workdir."""
    logs = [p.read_text(errors="replace") for p in workdir.rglob("*.txt") if p.is_file()]
    return proc.stdout + proc.stderr + "\n".join(logs)


def test_restart_loads_the_train_step_from_the_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    env = subprocess_env(1, cache_dir=str(tmp_path / "unused"))
    del env["JAX_COMPILATION_CACHE_DIR"]
    env[compile_cache.ENV_VAR] = str(cache)
    workdir = tmp_path / "run"

    first = subprocess.run(main_command(workdir, "--config.train.total_steps=1"), env=env,
                           capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    text = _run_text(first, workdir)
    assert f"compiled and written to the persistent compilation cache {cache}" in text, text[-3000:]
    assert any(cache.iterdir())

    second = subprocess.run(main_command(workdir, "--config.train.total_steps=2"), env=env,
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    text = _run_text(second, workdir)
    assert "resumed from the checkpoint of step 1" in text, text[-3000:]
    assert f"loaded from the persistent compilation cache {cache}" in text, text[-3000:]
    assert "(XLA:CPU preset fast_compile)" in text, text[-3000:]

    # Another XLA:CPU preset is another executable: the option reaches the step's compilation
    # (it is part of the cache key), so the step is compiled again, not loaded.
    third = subprocess.run(main_command(workdir, "--config.train.total_steps=3",
                                        "--config.xla_cpu_opt_preset=default"),
                           env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    text = _run_text(third, workdir)
    assert "resumed from the checkpoint of step 2" in text, text[-3000:]
    assert (f"compiled and written to the persistent compilation cache {cache} "
            "(XLA:CPU preset default)") in text, text[-3000:]


@pytest.mark.parametrize(
    "setting, environ, current, expected",
    [
        (None, {}, None, str(pathlib.Path.home() / ".cache/effdet_jax/xla_cache")),
        (None, {}, "/jax/own", "/jax/own"),
        (None, {compile_cache.ENV_VAR: "/from/env"}, "/jax/own", "/from/env"),
        ("/from/config", {compile_cache.ENV_VAR: "/from/env"}, None, "/from/config"),
        ("off", {compile_cache.ENV_VAR: "/from/env"}, "/jax/own", None),
        (None, {compile_cache.ENV_VAR: "OFF"}, "/jax/own", None),
    ],
)
def test_cache_dir_order(setting, environ, current, expected):
    assert compile_cache.cache_dir(setting, environ, current) == expected
