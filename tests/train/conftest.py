"""Trainer tests: make the repository root importable so ``configs.*`` resolve like in main.py."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One persistent compilation cache for the trainer tests and their subprocesses: the same tiny
# train step compiled on the same mesh (e.g. by a run and its restart) is then compiled once.
# Compiling it takes ~1-2 min on the 2-core CI machine, running it well under a second.
import os  # noqa: E402

import jax  # noqa: E402

COMPILATION_CACHE = os.environ.setdefault(
    "EFFDET_JAX_TEST_JAX_CACHE", str(pathlib.Path.home() / ".cache/effdet_jax/jax_cache_tests")
)
jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
