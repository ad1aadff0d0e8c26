"""The source registry: one list of sources that validation reads and ``make_source`` dispatches on,
importable without TensorFlow."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from effdet_jax.data import sources
from effdet_jax.data.config import default_data_config, validate_data_config
from effdet_jax.data.sources import BUILDERS, SOURCES, make_source


@pytest.mark.parametrize("name", SOURCES)
def test_every_registered_builder_exists(name):
    module_name, function_name = BUILDERS[name].split(":")
    module = importlib.import_module(f"effdet_jax.data.sources.{module_name}")
    assert callable(getattr(module, function_name))


def test_validation_and_make_source_list_the_registry():
    c = default_data_config()
    c.source = "kitti"
    with pytest.raises(ValueError) as info:
        validate_data_config(c)
    assert str(SOURCES) in str(info.value)
    with pytest.raises(ValueError) as info:
        make_source(c, "train")
    assert str(SOURCES) in str(info.value)


def test_registry_imports_no_tensorflow():
    code = (
        "import sys; from effdet_jax.data import sources; sources.SOURCES; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    root = pathlib.Path(sources.__file__).parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
