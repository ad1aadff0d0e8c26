"""Test set-up shared by every test module.

Eight simulated CPU devices are requested before jax is imported anywhere, so sharding tests can
build 8-device meshes; single-device tests are unaffected (they run on device 0).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402

import jax  # noqa: E402

# A persistent compilation cache makes repeated runs (and CI on a machine that ran the suite before)
# skip most XLA compiles; a cold cache only costs the normal compile time.
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("EFFDET_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/effdet_jax/xla_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)

import pytest  # noqa: E402
from automl_reference import AutomlReference, find_reference  # noqa: E402
from torch_refs import load_torch_reference  # noqa: E402, F401  (tests/models import it from here)

# shared/ sits beside the clone (as in CI); EFFDET_JAX_SHARED points elsewhere.
SHARED = pathlib.Path(
    os.environ.get("EFFDET_JAX_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared")
)
SHARED_REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def automl_reference() -> AutomlReference:
    """google/automl reference data: the full shared folder when present, else the compact copy
    in tests/reference/automl (see tests/automl_reference.py)."""
    return find_reference(SHARED_REFERENCE)


@pytest.fixture
def cpu_depthwise_kernel() -> None:
    """Skips the test when the FFI kernels (depthwise, batch norm) cannot be built here (no C++
    compiler). Under the policy ``require`` (``make test`` sets ``EFFDET_JAX_REQUIRE_CPU_KERNEL=1``,
    or ``EFFDET_JAX_CPU_KERNELS=require``) that is a failure instead, naming why.
    (A fixture rather than a helper: ``from conftest import`` can resolve to tests/train/conftest.)"""
    from effdet_jax.ops import policy

    try:
        resolved = policy.resolve()
    except RuntimeError as error:
        pytest.fail(str(error))
    if resolved.mode == "off":
        pytest.skip(f"CPU kernels switched off ({policy.ENV_VARIABLE}=off)")
    if not resolved.ffi:
        from effdet_jax.kernels.cpu_library import unavailable_reason

        pytest.skip(f"CPU kernels unavailable: {unavailable_reason()}")
