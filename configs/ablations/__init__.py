"""Ablations: each module here is a config (``--config=configs/ablations/NAME.py:ARM``, one arm on
its base model) and the definition of its sweep, ``sweep() -> {label: {config key: value}}``,
which ``experiments/ablate.py --sweep=NAME`` runs on any base config."""
