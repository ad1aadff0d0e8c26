"""Shared helpers of the trainer tests: tiny configs, deterministic random batches, tree diffs."""

import pathlib

import jax
import numpy as np

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**train_overrides):
    """``configs/tiny.py`` (a thin d0 at 64 px); ``train_overrides`` go into ``config.train``."""
    config = tiny.get_config()
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def random_batch(batch_size: int, image_size: int, num_classes: int, seed: int) -> dict:
    """Host numpy batch in the pipeline's layout: images, yxyx pixel boxes, 0-based classes."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32)
    num_boxes = 6
    yx = rng.uniform(0, image_size * 0.6, size=(batch_size, num_boxes, 2))
    hw = rng.uniform(image_size * 0.1, image_size * 0.4, size=(batch_size, num_boxes, 2))
    boxes = np.concatenate([yx, yx + hw], axis=-1).astype(np.float32)
    classes = rng.integers(0, num_classes, size=(batch_size, num_boxes)).astype(np.int32)
    classes[:, 4:] = -1  # padding rows
    boxes[:, 4:] = -1.0
    return {"images": images, "boxes": boxes, "classes": classes}


def max_abs_diff(a, b) -> float:
    """Largest absolute difference over two pytrees of equal structure."""
    diffs = jax.tree.map(
        lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        if np.size(x)
        else 0.0,
        jax.device_get(a),
        jax.device_get(b),
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def subprocess_env(num_devices: int, cache_dir: str | None = None, **extra: str) -> dict:
    """Environment for a ``main.py`` child: its own simulated device count, a shared persistent
    compilation cache (so restarts do not recompile), and the repository root importable."""
    import os

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir or env["EFFDET_JAX_TEST_JAX_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def main_command(workdir, *overrides: str, config: str = "configs/tiny.py") -> list[str]:
    import sys

    return [sys.executable, str(ROOT / "main.py"), f"--config={ROOT / config}",
            f"--workdir={workdir}", "--mode=train", *overrides]


def restore_state(config, workdir, step: int, devices=None):
    """The train state saved at ``step`` in ``workdir``, restored onto ``devices`` (host numpy)."""
    from effdet_jax.train import checkpointing, experiment
    from effdet_jax.train import mesh as mesh_lib

    devices = jax.devices()[:1] if devices is None else devices
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.model = len(devices), 1
    exp = experiment.build_experiment(config, mesh=mesh_lib.make_mesh(config.mesh, devices))
    options = checkpointing.CheckpointOptions(every_steps=1, keep=100, keep_best=0)
    manager = checkpointing.make_manager(f"{workdir}/checkpoints", options)
    target = checkpointing.abstract_with_shardings(exp.abstract_state, exp.state_shardings)
    state = checkpointing.restore(manager, target, step)
    manager.close()
    return jax.device_get(state)
