"""The PyTorch reference arrays (timm / effdet) the ``torch_ref`` tests compare against.

A plain module rather than a conftest fixture so every test folder imports it by name
(``tests/train`` has its own conftest, which shadows ``from conftest import``).
"""

import os
import pathlib

import numpy as np
import pytest


def load_torch_reference(name: str, required_key: str | None = None) -> dict[str, np.ndarray]:
    """Arrays written by ``tools/torch_reference/make_<name>.py`` in the PyTorch venv.

    ``make test`` builds them into ``$EFFDET_JAX_REFS`` and sets ``EFFDET_JAX_REQUIRE_REFS=1``, so in CI
    a missing file (or a file without ``required_key``, written by an older script) is a failure; a
    bare ``pytest`` without them skips the test with the fix.
    """
    root = pathlib.Path(
        os.environ.get("EFFDET_JAX_REFS", pathlib.Path.home() / ".cache/effdet_jax/torch_refs")
    )
    path = root / f"{name}.npz"
    missing = not path.exists()
    if not missing and required_key is not None:
        with np.load(path) as data:
            missing = required_key not in data.files
    if missing:
        what = f" (with {required_key})" if required_key is not None else ""
        message = f"PyTorch reference {path}{what} is missing: run `make refs` (builds the 3.11 torch venv)"
        if os.environ.get("EFFDET_JAX_REQUIRE_REFS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
