"""How ``main.py`` starts its process: re-executed once with a caching malloc when JAX computes on
the CPU.

XLA:CPU allocates a train step's large temporaries with ``malloc`` and frees them when the step
ends. glibc's malloc serves every block over 32 MiB with a fresh ``mmap`` and unmaps it on
``free``, so each step page-faults and zero-fills its whole working set again and spends more time
in the kernel than in the step's own code. tcmalloc and jemalloc keep freed extents and hand them
to the next step (jemalloc only with ``oversize_threshold:0``: by default it returns blocks over
8 MiB to the kernel at once). PyTorch's CPU tuning guide recommends the same preload, and the
benchmarks give both sides the same allocator (``benchmarks/RESULTS.md`` has the timings).

glibc's own knobs are not a safe substitute: ``mmap_max=0`` with one arena is as fast, but a small
allocation landing in a freed multi-GB hole makes the next step's block grow the heap instead,
until the process runs out of memory. Where neither tcmalloc nor jemalloc is installed
(``apt install libtcmalloc-minimal4``), the launcher only asks glibc for transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), which removes most page faults but still zero-fills
each step.

``LD_PRELOAD`` and ``GLIBC_TUNABLES`` are read when a process starts, so ``main.py`` calls
``reexec_with_cpu_malloc`` first thing: it replaces the process by the same command line with the
allocator preloaded (same PID), on glibc Linux, when JAX will compute on the CPU and the
environment does not preload one of ``ALLOCATORS`` already. A ``GLIBC_TUNABLES`` set by the caller
is kept and does not stop the preload.

Opt out with ``EFFDET_JAX_CPU_MALLOC=0``: the process then runs with the environment it was given.

Stdlib only: the benchmarks load this file by path, also from the PyTorch side's environment,
which has neither JAX nor effdet_jax.
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
# Shared objects, most preferred first, looked up by soname in ``LIBRARY_DIRS`` and in the
# loader's cache.
ALLOCATORS = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libjemalloc.so.2")
JEMALLOC_CONF = "oversize_threshold:0"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# JAX's accelerator plugins: when one is installed JAX may pick a GPU/TPU, and asking JAX which
# backend it uses would initialise that backend before jax.distributed.initialize.
_ACCELERATOR_PACKAGES = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-rocm-plugin",
                         "jax-rocm60-plugin", "jax-rocm7-plugin", "libtpu")


def find_allocator(library_dirs: Sequence[str] | None = None) -> str | None:
    """The path of the first of ``ALLOCATORS`` installed on this machine, or None.

    Each soname is looked for in ``library_dirs`` (default ``LIBRARY_DIRS``), then in the
    loader's cache, before the next soname is tried.
    """
    for soname in ALLOCATORS:
        for folder in LIBRARY_DIRS if library_dirs is None else library_dirs:
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


def preloads_allocator(environ: Mapping[str, str]) -> bool:
    """Whether ``environ``'s ``LD_PRELOAD`` names one of ``ALLOCATORS``."""
    preload = environ.get("LD_PRELOAD", "")
    return any(soname in preload for soname in ALLOCATORS)


def is_set_up(environ: Mapping[str, str], allocator: str | None) -> bool:
    """Whether ``environ`` already has what ``cpu_malloc_env(environ, allocator)`` would give it.

    With an allocator installed that is a preloaded one of ``ALLOCATORS``; glibc's huge-page
    tunable does not count then, so a shell or Makefile that sets it still gets the allocator.
    Without one (``allocator`` None) it is the huge-page tunable (or a preload set by the caller).
    """
    if preloads_allocator(environ):
        return True
    return allocator is None and HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def status_line(environ: Mapping[str, str]) -> str:
    """One line for the log: which malloc this process runs with, and how to get a faster one."""
    preload = environ.get("LD_PRELOAD", "")
    for soname in ALLOCATORS:
        if soname in preload:
            return f"CPU malloc: {soname} preloaded"
    if environ.get(OPT_OUT_VARIABLE) == "0":
        return f"CPU malloc: as given ({OPT_OUT_VARIABLE}=0)"
    return ("CPU malloc: glibc; install libtcmalloc-minimal4 (or libjemalloc2) for faster CPU "
            "train steps (effdet_jax/train/launcher.py)")


def should_reexec(environ: Mapping[str, str], allocator: str | None) -> bool:
    """Re-execute: glibc Linux, JAX on the CPU, not opted out, not set up for ``allocator`` yet."""
    return (
        sys.platform == "linux"
        and platform.libc_ver()[0] == "glibc"
        and environ.get(OPT_OUT_VARIABLE, "1") != "0"
        and not is_set_up(environ, allocator)
        and jax_will_use_cpu(environ)
    )


def reexec_with_cpu_malloc(
    argv: Sequence[str] | None = None, library_dirs: Sequence[str] | None = None
) -> None:
    """Replace this process by the same command line with ``cpu_malloc_env``, when
    ``should_reexec``; otherwise return.

    Call it first thing in a ``__main__``, before any computation. ``argv`` defaults to the
    interpreter's whole original command line (``sys.orig_argv``, interpreter options included);
    ``library_dirs`` is passed to ``find_allocator``. The PID stays the same, so signals and
    ``kill`` reach the re-executed process, which finds the same allocator and goes on.
    """
    allocator = find_allocator(library_dirs)
    if should_reexec(os.environ, allocator):
        sys.stdout.flush()
        sys.stderr.flush()
        env = cpu_malloc_env(os.environ, allocator)
        os.execve(sys.executable, list(argv or sys.orig_argv), env)
