"""Depthwise convolution on XLA:CPU through the XLA FFI (``depthwise_cpu.cc``).

The C++ source ships with the package and is compiled on first use with the system's C++
compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``) into a cache folder
(``$EFFDET_JAX_KERNEL_CACHE``, default ``~/.cache/effdet_jax/kernels``), keyed by the source, the
compiler, jaxlib and the CPU, so a machine builds it once (about 3 s). Where no compiler is found
or the build fails, :func:`unavailable_reason` says why and ``depthwise_impl="auto"`` falls back
to the XLA shift-and-add formulation (same values to float32 rounding).

All three operations are independent per image, and each is wrapped in ``custom_partitioning``
so that under a sharded ``jax.jit`` it runs on every device's shard of the batch (and of the
channels, if those are sharded) with no gathering; the kernel gradient is returned per image and
summed over the batch in XLA, which the SPMD partitioner turns into the usual gradient
all-reduce. Layouts: ``x`` / ``y`` ``[N, H, W, C]`` float32, kernel ``[kh, kw, 1, C]``.
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
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

SOURCE = pathlib.Path(__file__).with_name("depthwise_cpu.cc")
CACHE_VARIABLE = "EFFDET_JAX_KERNEL_CACHE"
_TARGETS = {
    "effdet_depthwise_forward": "EffdetDepthwiseForward",
    "effdet_depthwise_input_grad": "EffdetDepthwiseInputGrad",
    "effdet_depthwise_kernel_grad": "EffdetDepthwiseKernelGrad",
}
Pads = tuple[tuple[int, int], tuple[int, int]]
MAX_KERNEL_SIZE = 16  # kMaxTaps in depthwise_cpu.cc


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
            [SOURCE.read_text(), version, " ".join(_compile_flags()), jaxlib.__version__, _cpu_signature()]
        ).encode()
    ).hexdigest()[:16]
    cache = pathlib.Path(
        os.environ.get(CACHE_VARIABLE) or pathlib.Path.home() / ".cache" / "effdet_jax" / "kernels"
    )
    library = cache / f"depthwise_cpu_{key}.so"
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
            [cxx, *_compile_flags(), str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=600
        )
        if result.returncode != 0:
            return None, f"building {SOURCE.name} with {cxx} failed:\n{result.stderr[-4000:]}"
        os.replace(partial, library)
        partial = None
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"building {SOURCE.name} failed: {error}"
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return library, ""


@functools.cache
def _register() -> str:
    """Builds, loads and registers the FFI targets; returns "" or why they are unavailable."""
    library, reason = _build()
    if library is None:
        logging.warning("effdet_jax: CPU depthwise kernel unavailable, using XLA's: %s", reason)
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


def _attributes(stride: int, pads: Pads, dilation: int) -> dict[str, np.int64]:
    return {
        "stride": np.int64(stride),
        "dilation": np.int64(dilation),
        "pad_top": np.int64(pads[0][0]),
        "pad_left": np.int64(pads[1][0]),
    }


def _batch_and_channel_sharding(arg_shape) -> tuple:
    """The batch and channel axes of an ``[N, H, W, C]`` operand's sharding (spatial axes are
    replicated: the kernels need whole rows and columns)."""
    spec = getattr(arg_shape.sharding, "spec", None)
    if spec is None:
        raise NotImplementedError(
            "depthwise_impl='cpu_ffi' under sharding needs a named mesh (jax.sharding.Mesh with "
            f"NamedSharding), got {arg_shape.sharding}; use depthwise_impl='shift_add' otherwise"
        )
    spec = tuple(spec) + (None,) * 4
    return spec[0], spec[3]


def _partitioned(body, operand_kinds: tuple[str, str], rule: str):
    """``custom_partitioning`` of a per-image operation: image-shaped operands and the result keep
    the batch and channel sharding of the first operand; kernel-shaped operands only the channel's.
    ``rule`` names the batch factor ``n`` and the channel factor ``c``; every other factor (the
    spatial and kernel axes) must stay whole on each device."""
    # Shardy wants the need-replication factors in the order they first appear in the rule.
    factors = dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
    replicated = tuple(f for f in factors if f not in ("n", "c"))

    def spec(kind: str, batch, channel) -> P:
        return P(batch, None, None, channel) if kind == "image" else P(None, None, None, channel)

    def partition(mesh, arg_shapes, result_shape):
        batch, channel = _batch_and_channel_sharding(arg_shapes[0])
        args = tuple(NamedSharding(mesh, spec(kind, batch, channel)) for kind in operand_kinds)
        return mesh, body, NamedSharding(mesh, spec("image", batch, channel)), args

    def infer(mesh, arg_shapes, result_shape):
        batch, channel = _batch_and_channel_sharding(arg_shapes[0])
        return NamedSharding(mesh, spec("image", batch, channel))

    wrapped = custom_partitioning(body)
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=replicated,
    )
    return wrapped


@functools.cache
def _operation(target: str, operand_kinds: tuple[str, str], rule: str, stride: int, pads: Pads,
               dilation: int, result_hw: tuple[int, int]):
    """One FFI target as a partitioned function of two operands. Every result is
    ``[N, *result_hw, C]`` with N and C of the first operand (the kernel gradient is per image)."""
    attrs = _attributes(stride, pads, dilation)

    def body(first, second):
        shape = jax.ShapeDtypeStruct((first.shape[0], *result_hw, first.shape[3]), first.dtype)
        return jax.ffi.ffi_call(target, shape)(first, second, **attrs)

    return _partitioned(body, operand_kinds, rule)


def _check(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[3]:
        raise ValueError(f"depthwise: x {x.shape} must be [N,H,W,C] and kernel {kernel.shape} [kh,kw,1,C]")
    if max(kernel.shape[:2]) > MAX_KERNEL_SIZE:
        raise ValueError(
            f"depthwise_impl='cpu_ffi' takes kernels up to {MAX_KERNEL_SIZE}x{MAX_KERNEL_SIZE}, got "
            f"{kernel.shape[0]}x{kernel.shape[1]}; use depthwise_impl='shift_add'"
        )
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
        raise ValueError(
            f"depthwise_impl='cpu_ffi' takes float32 only (got {x.dtype}, {kernel.dtype}); "
            "use depthwise_impl='auto' or 'shift_add' for other dtypes"
        )
    if jax.default_backend() != "cpu":
        raise ValueError(
            f"depthwise_impl='cpu_ffi' runs on CPU only (the default backend is {jax.default_backend()}); "
            "use depthwise_impl='auto' or 'lax'"
        )
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"depthwise_impl='cpu_ffi' is unavailable: {reason}")


def output_size(size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int) -> int:
    return (size + pads[0] + pads[1] - (kernel - 1) * dilation - 1) // stride + 1


def forward(x: jax.Array, kernel: jax.Array, stride: int, pads: Pads, dilation: int = 1) -> jax.Array:
    """Depthwise correlation of ``x`` ``[N, H, W, C]`` with ``kernel`` ``[kh, kw, 1, C]``, zero
    padding ``pads`` ((top, bottom), (left, right)); returns ``[N, OH, OW, C]``."""
    _check(x, kernel)
    kh, kw = kernel.shape[:2]
    out_hw = (
        output_size(x.shape[1], kh, stride, pads[0], dilation),
        output_size(x.shape[2], kw, stride, pads[1], dilation),
    )
    forward_op = _operation("effdet_depthwise_forward", ("image", "kernel"), "n h w c, a b o c -> n i j c",
                            stride, pads, dilation, out_hw)
    return forward_op(x, kernel)


def input_grad(
    g: jax.Array, kernel: jax.Array, in_hw: tuple[int, int], stride: int, pads: Pads, dilation: int = 1
) -> jax.Array:
    """The gradient of :func:`forward` with respect to ``x`` (``[N, *in_hw, C]``) for the output
    gradient ``g`` ``[N, OH, OW, C]``."""
    _check(g, kernel)
    input_grad_op = _operation("effdet_depthwise_input_grad", ("image", "kernel"),
                               "n i j c, a b o c -> n h w c", stride, pads, dilation, tuple(in_hw))
    return input_grad_op(g, kernel)


def kernel_grad(
    x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int], stride: int, pads: Pads, dilation: int = 1
) -> jax.Array:
    """The gradient of :func:`forward` with respect to the kernel, ``[kh, kw, 1, C]``."""
    kernel_grad_op = _operation("effdet_depthwise_kernel_grad", ("image", "image"),
                                "n h w c, n i j c -> n a b c", stride, pads, dilation, tuple(kernel_hw))
    per_image = kernel_grad_op(x, g)
    return jnp.sum(per_image, axis=0)[:, :, None, :]
