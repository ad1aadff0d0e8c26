"""Checkpoint converters: timm / effdet (PyTorch) state dicts and google/automl TF checkpoints."""

from effdet_jax.convert.automl import convert_automl_arrays, load_automl_checkpoint
from effdet_jax.convert.common import CheckpointMismatchError
from effdet_jax.convert.effdet import load_effdet_state_dict
from effdet_jax.convert.timm import load_timm_efficientnet

__all__ = [
    "CheckpointMismatchError",
    "convert_automl_arrays",
    "load_automl_checkpoint",
    "load_effdet_state_dict",
    "load_timm_efficientnet",
]
