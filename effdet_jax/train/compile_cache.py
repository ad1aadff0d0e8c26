"""JAX's persistent compilation cache, on by default for runs of ``main.py``.

A restart, a resumed run or another ablation arm with the same shapes then loads its compiled
train / eval steps from disk instead of compiling them again (minutes for the big configs).

Where the cache lives, first match wins:

1. ``config.compilation_cache`` when set: a directory, or ``off`` to disable it;
2. ``$EFFDET_JAX_COMPILATION_CACHE`` (a directory, or ``off``);
3. the directory JAX already has (``$JAX_COMPILATION_CACHE_DIR``, or set by the calling program);
4. ``~/.cache/effdet_jax/xla_cache``.

``CacheEvents`` counts the cache hits and misses JAX reports, so the trainer can say whether a
step was loaded or compiled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

ENV_VAR = "EFFDET_JAX_COMPILATION_CACHE"
DEFAULT_DIR = os.path.join("~", ".cache", "effdet_jax", "xla_cache")
OFF = "off"
# Only programs that take at least this long to compile are written: the train and eval steps,
# not the many small helper functions.
MIN_COMPILE_TIME_S = 1.0
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"


def cache_dir(
    setting: str | None, environ: Mapping[str, str] = os.environ, current: str | None = None
) -> str | None:
    """The cache directory for ``config.compilation_cache`` = ``setting`` (``None``: unset) and
    JAX's ``current`` one, or ``None`` when the cache is off (order: the module docstring)."""
    for value in (setting, environ.get(ENV_VAR), current):
        if value:
            return None if value.strip().lower() == OFF else os.path.expanduser(value)
    return os.path.expanduser(DEFAULT_DIR)


class CacheEvents:
    """Counts of persistent-cache hits and misses since this process enabled the cache."""

    hits = 0
    misses = 0
    _listening = False

    @classmethod
    def listen(cls) -> None:
        if cls._listening:
            return
        cls._listening = True

        def on_event(event: str, **kwargs) -> None:
            del kwargs
            if event == _HIT:
                cls.hits += 1
            elif event == _MISS:
                cls.misses += 1

        jax.monitoring.register_event_listener(on_event)

    @classmethod
    def snapshot(cls) -> tuple[int, int]:
        return cls.hits, cls.misses


def enable(setting: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """Points JAX's persistent cache at ``cache_dir(setting)`` (or turns it off) and starts
    counting its events; returns the directory (``None``: off)."""
    directory = cache_dir(setting, environ, jax.config.jax_compilation_cache_dir)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    CacheEvents.listen()
    return directory


def describe(before: tuple[int, int], directory: str | None) -> str:
    """How the programs compiled since ``before`` (a ``CacheEvents.snapshot()``) were obtained."""
    if directory is None:
        return "compiled (persistent compilation cache off)"
    hits, misses = (now - then for now, then in zip(CacheEvents.snapshot(), before, strict=True))
    if hits and not misses:
        return f"loaded from the persistent compilation cache {directory}"
    if misses:
        return f"compiled and written to the persistent compilation cache {directory}"
    return f"compiled (below the cache's {MIN_COMPILE_TIME_S:g} s threshold, or already in memory)"
