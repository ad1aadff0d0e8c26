"""The one switch for the hand-written XLA:CPU kernels (``effdet_jax.kernels``).

Modes (:data:`MODES`):

* ``auto``: on CPU the ops use the FFI kernels where they build (float32 ``[batch, height, width,
  channels]`` operands) and XLA formulations tuned for XLA:CPU elsewhere; on other platforms
  XLA's plain ops.
* ``off``: XLA's plain ops on every platform (the grouped convolution for depthwise, autodiff for
  batch norm and the stem convolution): the program a GPU runs, also on CPU.
* ``require``: as ``auto``, but an error naming why when the kernels cannot be built.

A model reads its mode once (``EfficientDetConfig.cpu_kernels`` / ``EfficientNet.cpu_kernels``;
``None`` means the process default, ``$EFFDET_JAX_CPU_KERNELS`` or ``auto``) and traces its ops
inside :func:`cpu_kernels`; the ops read :func:`current` while they are traced. Which branch runs
is decided by ``jax.lax.platform_dependent`` inside the traced function, not by the default
backend, so one traced function is right on CPU and on GPU / TPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Iterator

MODES = ("auto", "off", "require")
ENV_VARIABLE = "EFFDET_JAX_CPU_KERNELS"
# ``make test`` sets this; it means ``require`` for the process default.
REQUIRE_VARIABLE = "EFFDET_JAX_REQUIRE_CPU_KERNEL"


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """A resolved policy.

    Attributes:
      mode: one of :data:`MODES`.
      ffi: the FFI kernels are built and allowed (the CPU branches call them for float32).
    """

    mode: str
    ffi: bool

    @property
    def cpu_paths(self) -> bool:
        """Whether the ops select a CPU-specific branch with ``platform_dependent`` (not ``off``)."""
        return self.mode != "off"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"cpu_kernels={mode!r} is not allowed; choose one of {MODES}")
    return mode


def default_mode() -> str:
    """``$EFFDET_JAX_CPU_KERNELS``, else ``require`` when ``$EFFDET_JAX_REQUIRE_CPU_KERNEL=1``,
    else ``auto``."""
    mode = os.environ.get(ENV_VARIABLE)
    if mode:
        return check_mode(mode)
    return "require" if os.environ.get(REQUIRE_VARIABLE) == "1" else "auto"


def resolve(mode: str | None = None, unavailable_reason: str | None = None) -> CpuKernels:
    """The policy for ``mode`` (``None``: :func:`default_mode`).

    ``unavailable_reason`` is why the kernels cannot be built ("" when they can); by default the
    kernels are built (once per machine) to find out. Raises ``RuntimeError`` for ``require``
    when they cannot be built.
    """
    mode = check_mode(default_mode() if mode is None else mode)
    if mode == "off":
        return CpuKernels("off", False)
    if unavailable_reason is None:
        from effdet_jax.kernels.cpu_library import unavailable_reason as build

        unavailable_reason = build()
    if unavailable_reason and mode == "require":
        raise RuntimeError(f"cpu_kernels='require' but the CPU kernels cannot be built: {unavailable_reason}")
    return CpuKernels(mode, not unavailable_reason)


_ACTIVE: contextvars.ContextVar[CpuKernels | None] = contextvars.ContextVar(
    "effdet_jax_cpu_kernels", default=None
)


@contextlib.contextmanager
def cpu_kernels(mode: str | CpuKernels | None) -> Iterator[CpuKernels]:
    """Ops traced inside use the policy ``mode``; ``None`` keeps the enclosing one.

    The policy is read when a function is traced: a ``jax.jit`` function traced before keeps the
    policy it was traced with.
    """
    if mode is None:
        yield current()
        return
    policy = mode if isinstance(mode, CpuKernels) else resolve(mode)
    token = _ACTIVE.set(policy)
    try:
        yield policy
    finally:
        _ACTIVE.reset(token)


def current() -> CpuKernels:
    """The policy of the enclosing :func:`cpu_kernels`, else the process default."""
    policy = _ACTIVE.get()
    return resolve() if policy is None else policy
