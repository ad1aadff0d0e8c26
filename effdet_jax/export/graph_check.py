"""Checks that an exported program is the plain XLA graph: no FFI kernels, no host callbacks,
no custom partitioning, and no platform-dependent branches of ours.

Two views: the jaxpr (no ``platform_index`` from ``lax.platform_dependent``, no FFI or callback
primitives) and the StableHLO (no ``custom_call`` but jax.export's own shape assertions). A
multi-platform StableHLO module may still hold ``stablehlo.case`` on the platform index where
jax itself lowers a primitive per platform (the convolution does); those are jax's, not ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.extend import core as jcore

# custom_call targets a plain inference graph may hold (XLA's own ops are not custom calls).
# Anything else (``effdet_*`` FFI kernels, ``xla_python_cpu_callback`` host callbacks,
# ``CustomSPMDPartitioning``) fails the check.
ALLOWED_CUSTOM_CALLS = frozenset({"shape_assertion"})  # jax.export's checks of symbolic dims
# jaxpr primitives that make a graph more than plain XLA.
FORBIDDEN_PRIMITIVES = frozenset({
    "platform_index", "ffi_call", "pure_callback", "io_callback", "callback", "custom_partitioning",
})
_CUSTOM_CALL = re.compile(r"custom_call\s*@([\w.$-]+)")


def custom_call_targets(mlir_text: str) -> set[str]:
    """The ``custom_call`` targets in StableHLO text."""
    return set(_CUSTOM_CALL.findall(mlir_text))


def _primitives(jaxpr: Any) -> Iterator[str]:
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for item in value if isinstance(value, tuple | list) else (value,):
                if isinstance(item, jcore.ClosedJaxpr):
                    yield from _primitives(item.jaxpr)
                elif isinstance(item, jcore.Jaxpr):
                    yield from _primitives(item)


def primitive_names(fn: Callable, *specs: jax.ShapeDtypeStruct) -> set[str]:
    """Every primitive in ``fn``'s jaxpr at ``specs``, inner bodies included."""
    return set(_primitives(jax.make_jaxpr(fn)(*specs).jaxpr))


def check_plain_xla(fn: Callable, spec: jax.ShapeDtypeStruct, exported: jax.export.Exported) -> None:
    """Raises ``ValueError`` naming what makes ``fn`` / ``exported`` more than plain XLA."""
    problems = []
    bad = primitive_names(fn, spec) & FORBIDDEN_PRIMITIVES
    if bad:
        problems.append(f"primitives {sorted(bad)}")
    extra = custom_call_targets(exported.mlir_module()) - ALLOWED_CUSTOM_CALLS
    if extra:
        problems.append(f"custom calls {sorted(extra)}")
    if problems:
        raise ValueError(
            "the exported graph is not plain XLA: " + "; ".join(problems) + ". Export the model "
            "with cpu_kernels='off' (effdet_jax.export.serving.plain_model does)"
        )
