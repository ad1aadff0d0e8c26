"""A caching malloc for XLA:CPU training: re-execute with tcmalloc (or jemalloc) preloaded.

XLA:CPU allocates a step's buffers with ``malloc`` (a D0 train step at 512 px, batch 4: 5.9 GB of
temporaries) and frees them when the step ends. glibc's malloc serves every block over 32 MiB
with a fresh ``mmap`` and unmaps it on ``free``, so every step page-faults and zero-fills its whole
working set again: 1.5 M page faults and more system than user time per D0 step, which takes
3.7 s instead of 1.4 s (2 cores, ``benchmarks/RESULTS.md``). tcmalloc and jemalloc keep freed
extents and hand them to the next step (jemalloc only with ``oversize_threshold:0``: by default
it returns blocks over 8 MiB to the kernel at once). PyTorch's CPU tuning guide recommends the
same preload, and the benchmarks give both sides the same allocator.

glibc's own knobs are not a safe substitute: ``mmap_max=0`` with one arena gets the speed, but a
small allocation landing in a freed multi-GB hole makes the next step's block grow the heap
instead, and a D0 batch-8 step was OOM-killed at 23 GB that way. Without tcmalloc or jemalloc
installed (``apt install libtcmalloc-minimal4``), ``main.py`` only asks glibc for transparent huge
pages, which cuts the page faults ~500x but still zero-fills each step.

``LD_PRELOAD`` and ``GLIBC_TUNABLES`` are read when a process starts, so ``main.py`` re-executes
itself once (``reexec_with_cpu_malloc``), before anything else runs, when JAX will compute on the
CPU. ``EFFDET_JAX_CPU_MALLOC=0`` keeps the environment as it is.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import pathlib
import platform
import sys
from collections.abc import Mapping, Sequence

OPT_OUT_VARIABLE = "EFFDET_JAX_CPU_MALLOC"
# Shared objects, most preferred first, looked up by soname in the loader's cache and in the
# usual library folders.
ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
JEMALLOC_CONF = "oversize_threshold:0"
_LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                 "/usr/lib", "/usr/local/lib")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# JAX's accelerator plugins: when one is installed JAX may pick a GPU/TPU, and asking JAX which
# backend it uses would initialise that backend before jax.distributed.initialize.
_ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm-plugin",
                         "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu")


def find_allocator() -> str | None:
    """The path of the first of ``ALLOCATORS`` installed on this machine, or None."""
    for soname in ALLOCATORS:
        for folder in _LIBRARY_DIRS:
            path = pathlib.Path(folder) / soname
            if path.exists():
                return str(path)
        stem = soname.removeprefix("lib").split(".so")[0]
        found = ctypes.util.find_library(stem)
        if found == soname:
            return soname  # the loader resolves a bare soname through its cache
    return None


def jax_will_use_cpu(environ: Mapping[str, str]) -> bool:
    """Whether JAX will compute on the CPU, decided without initialising any backend:
    ``JAX_PLATFORMS`` names only ``cpu``, or it is unset and no accelerator plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return {p.strip() for p in platforms.split(",") if p.strip()} == {"cpu"}
    for package in _ACCELERATOR_PACKAGES:
        try:
            importlib.metadata.version(package)
            return False
        except importlib.metadata.PackageNotFoundError:
            continue
    return True


def cpu_malloc_env(environ: Mapping[str, str], allocator: str | None) -> dict[str, str]:
    """A copy of ``environ`` with ``allocator`` added to ``LD_PRELOAD`` (and ``JEMALLOC_CONF`` to
    ``MALLOC_CONF`` for jemalloc) or, when it is None, with glibc's huge-page tunable added to
    ``GLIBC_TUNABLES``; other entries are kept."""
    env = dict(environ)
    if allocator:
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        env["LD_PRELOAD"] = ":".join([allocator, *preload])
        if "jemalloc" in allocator:
            env["MALLOC_CONF"] = ",".join(filter(None, [env.get("MALLOC_CONF"), JEMALLOC_CONF]))
    else:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        tunables = [t for t in tunables if not t.startswith("glibc.malloc.hugetlb=")]
        env["GLIBC_TUNABLES"] = ":".join([*tunables, HUGE_PAGES_TUNABLE])
    return env


def has_cpu_malloc(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` already preloads one of ``ALLOCATORS`` or sets the huge-page tunable."""
    preload = environ.get("LD_PRELOAD", "")
    return (any(soname in preload for soname in ALLOCATORS)
            or HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":"))


def status_line(environ: Mapping[str, str]) -> str:
    """One line for the log: which malloc this process runs with, and how to get a faster one."""
    preload = environ.get("LD_PRELOAD", "")
    for soname in ALLOCATORS:
        if soname in preload:
            return f"CPU malloc: {soname} preloaded"
    if environ.get(OPT_OUT_VARIABLE) == "0":
        return f"CPU malloc: as given ({OPT_OUT_VARIABLE}=0)"
    return ("CPU malloc: glibc; install libtcmalloc-minimal4 (or libjemalloc2) to make CPU train "
            "steps 1.5-2.6x faster (effdet_jax/cpu_malloc.py)")


def should_reexec(environ: Mapping[str, str]) -> bool:
    """Re-execute: glibc Linux, JAX on the CPU, not opted out, not already set up."""
    return (
        sys.platform == "linux"
        and platform.libc_ver()[0] == "glibc"
        and environ.get(OPT_OUT_VARIABLE, "1") != "0"
        and not has_cpu_malloc(environ)
        and jax_will_use_cpu(environ)
    )


def reexec_with_cpu_malloc(argv: Sequence[str] | None = None) -> None:
    """Replace this process by the same command line with ``cpu_malloc_env``, when
    ``should_reexec``.

    Call it first thing in a ``__main__``, before any computation. ``argv`` defaults to the
    interpreter's whole original command line (``sys.orig_argv``, interpreter options included).
    The PID stays the same, so signals and ``kill`` reach the re-executed process.
    """
    if should_reexec(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        env = cpu_malloc_env(os.environ, find_allocator())
        os.execve(sys.executable, list(argv or sys.orig_argv), env)
