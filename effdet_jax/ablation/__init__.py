"""Ablation sweeps, the pieces of ``experiments/ablate.py`` and ``experiments/cost.py``: ``sweep``
(arms and their resolved configs), ``runs`` (one ``main.py`` run per arm and seed), ``stats``
(intervals, paired differences, curve area, convergence) and ``report`` (``results.json``,
``table.md``, plots). ``runs`` and the presets (``configs/ablations/``) need a source checkout:
they start the repository's ``main.py`` and import its ``configs``."""
