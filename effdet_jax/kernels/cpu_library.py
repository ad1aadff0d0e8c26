"""Builds, loads and registers the XLA:CPU FFI kernels of this package, and partitions them.

The C++ sources (``depthwise_cpu.cc``, ``batch_norm_cpu.cc`` and their shared ``cpu_common.h``)
ship with the package and are compiled together on first use with the system's C++ compiler
(``$CXX``, else ``c++`` / ``g++`` / ``clang++``) into one library in a cache folder
(``$EFFDET_JAX_KERNEL_CACHE``, default ``~/.cache/effdet_jax/kernels``), keyed by the sources, the
compiler, jaxlib and the CPU, so a machine builds it once (a few seconds). Where no compiler is
found or the build fails, :func:`unavailable_reason` says why; the CPU-kernel policy
(``effdet_jax.ops.policy``) then uses XLA's ops, or raises for ``require``.

Every kernel is independent per image: :func:`partitioned` wraps one in ``custom_partitioning``
so that under a sharded ``jax.jit`` it runs on each device's shard of the batch (and of the
channels, if those are sharded) with no gathering.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jaxlib
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "depthwise_cpu.cc", _HERE / "batch_norm_cpu.cc")
HEADERS = (_HERE / "cpu_common.h",)
CACHE_VARIABLE = "EFFDET_JAX_KERNEL_CACHE"
_TARGETS = {
    "effdet_depthwise_forward": "EffdetDepthwiseForward",
    "effdet_depthwise_input_grad": "EffdetDepthwiseInputGrad",
    "effdet_depthwise_kernel_grad": "EffdetDepthwiseKernelGrad",
    "effdet_channel_sums": "EffdetChannelSums",
    "effdet_bn_backward_sums": "EffdetBnBackwardSums",
    "effdet_bn_backward_input": "EffdetBnBackwardInput",
    "effdet_bn_swish": "EffdetBnSwish",
}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    # -march=native code must not be reused on a CPU with fewer instruction sets.
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _source_names() -> str:
    return " and ".join(f.name for f in SOURCES)


def _compile_flags() -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-march=native", "-w", f"-I{jax.ffi.include_dir()}"]


@functools.cache
def _build() -> tuple[pathlib.Path | None, str]:
    """Compiles the kernels once per machine; returns (library path, "") or (None, reason)."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX, or install g++ / clang++)"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{cxx} --version failed: {error}"
    key = hashlib.sha256(
        "\n".join(
            [*(f.read_text() for f in SOURCES + HEADERS), version, " ".join(_compile_flags()),
             jaxlib.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    cache = pathlib.Path(
        os.environ.get(CACHE_VARIABLE) or pathlib.Path.home() / ".cache" / "effdet_jax" / "kernels"
    )
    library = cache / f"effdet_cpu_kernels_{key}.so"
    if library.exists():
        return library, ""
    partial = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so that concurrent processes (pytest -n) never load
        # a half-written library.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        result = subprocess.run(
            [cxx, *_compile_flags(), *map(str, SOURCES), "-o", partial],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            return None, f"building {_source_names()} with {cxx} failed:\n{result.stderr[-4000:]}"
        os.replace(partial, library)
        partial = None
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building {_source_names()} failed: {error}"
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return library, ""


@functools.cache
def _register() -> str:
    """Builds, loads and registers the FFI targets; returns "" or why they are unavailable."""
    library, reason = _build()
    if library is None:
        logging.warning("effdet_jax: CPU kernels unavailable, using XLA's ops: %s", reason)
        return reason
    lib = ctypes.cdll.LoadLibrary(str(library))
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return ""


def unavailable_reason() -> str:
    """"" when the kernels are built and registered, else why not (compiler missing, build error)."""
    return _register()


def available() -> bool:
    return not _register()


def _batch_and_channel_sharding(arg_shape) -> tuple:
    """The batch and channel axes of an ``[N, H, W, C]`` operand's sharding (spatial axes are
    replicated: the kernels need whole rows and columns)."""
    spec = getattr(arg_shape.sharding, "spec", None)
    if spec is None:
        raise NotImplementedError(
            "the CPU FFI kernels under sharding need a named mesh (jax.sharding.Mesh with "
            f"NamedSharding), got {arg_shape.sharding}; use cpu_kernels='off' otherwise"
        )
    spec = tuple(spec) + (None,) * 4
    return spec[0], spec[3]


# How each kind of operand or result is sharded, given the batch and channel mesh axes of the
# first operand: "image" [N, H, W, C], "kernel" [kh, kw, 1, C], "channels" [K, C], "sums" [N, K, C].
_SPECS = {
    "image": lambda b, c: P(b, None, None, c),
    "kernel": lambda b, c: P(None, None, None, c),
    "channels": lambda b, c: P(None, c),
    "sums": lambda b, c: P(b, None, c),
}


def partitioned(body, operand_kinds: tuple[str, ...], result_kind: str, rule: str):
    """``custom_partitioning`` of a per-image operation whose first operand is ``[N, H, W, C]``:
    operands and the result keep that operand's batch and / or channel sharding as their kind
    (``_SPECS``) says. ``rule`` is the Shardy rule and names the batch factor ``n`` and the channel
    factor ``c``; every other factor (the spatial and kernel axes) must stay whole on each
    device."""
    # Shardy wants the need-replication factors in the order they first appear in the rule.
    factors = dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
    replicated = tuple(f for f in factors if f not in ("n", "c"))

    def partition(mesh, arg_shapes, result_shape):
        batch, channel = _batch_and_channel_sharding(arg_shapes[0])
        args = tuple(NamedSharding(mesh, _SPECS[kind](batch, channel)) for kind in operand_kinds)
        return mesh, body, NamedSharding(mesh, _SPECS[result_kind](batch, channel)), args

    def infer(mesh, arg_shapes, result_shape):
        batch, channel = _batch_and_channel_sharding(arg_shapes[0])
        return NamedSharding(mesh, _SPECS[result_kind](batch, channel))

    wrapped = custom_partitioning(body)
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=replicated,
    )
    return wrapped
