"""Ablation presets, one module each (the one place they are defined; ``experiments.sweep.PRESETS``
lists them). Each module is a config (``--config=configs/ablations/NAME.py:ARM``, one arm on its
COCO base model), the definition of its sweep, ``sweep() -> {label: {config key: value}}`` built
from the model's enumeration it ablates, and ``BASELINE``, the arm the others are compared with.
``experiments/ablate.py --sweep=NAME`` runs the sweep on any base config."""
