"""XLA compile options of the train step: ``config.xla_cpu_opt_preset``.

XLA:CPU has optimisation presets (``DebugOptions.xla_cpu_opt_preset``). ``fast_compile`` trades
optimisation passes for compile time; on the EfficientDet train step it halves XLA:CPU's compile
(CPU seconds) at an unchanged step time, measured in ``benchmarks/RESULTS.md`` ("XLA:CPU's
optimisation preset"), which is why it is the default. ``default`` is XLA's own preset and
``fast_runtime`` its other one. The preset is passed to the jitted train step's
``compiler_options`` only when its devices are CPUs; other backends compile as they always do.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax

# config value -> XLA's enum name.
CPU_OPT_PRESETS = {
    "fast_compile": "CPU_OPT_PRESET_FAST_COMPILE",
    "default": "CPU_OPT_PRESET_DEFAULT",
    "fast_runtime": "CPU_OPT_PRESET_FAST_RUNTIME",
}


def train_step_compiler_options(cpu_opt_preset: str,
                                devices: Iterable[jax.Device]) -> dict[str, str] | None:
    """``jax.jit(..., compiler_options=...)`` for a step compiled for ``devices``: the XLA:CPU
    preset named by ``cpu_opt_preset`` (a key of ``CPU_OPT_PRESETS``) when they are CPUs, else
    ``None`` (nothing changed)."""
    if cpu_opt_preset not in CPU_OPT_PRESETS:
        raise ValueError(f"xla_cpu_opt_preset={cpu_opt_preset!r}: allowed {list(CPU_OPT_PRESETS)}")
    if {d.platform for d in devices} != {"cpu"}:
        return None
    return {"xla_cpu_opt_preset": CPU_OPT_PRESETS[cpu_opt_preset]}
