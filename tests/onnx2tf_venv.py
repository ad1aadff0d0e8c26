"""The onnx2tf venv the SavedModel / LiteRT tests need (``make onnx2tf``)."""

import os

import pytest


def require_onnx2tf() -> None:
    """Skips the calling test when the converter's venv is missing, naming how to build it; fails
    instead with ``EFFDET_JAX_REQUIRE_ONNX2TF=1`` (a run that must not skip it)."""
    from effdet_jax.export import litert

    try:
        litert.venv_python()
    except litert.ConverterMissingError as e:
        if os.environ.get("EFFDET_JAX_REQUIRE_ONNX2TF") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
