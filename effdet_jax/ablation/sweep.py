"""The arms of an ablation sweep, and each arm's resolved, validated config.

A sweep is one or more dimensions, each from a ``--sweep`` argument, and the arms are their grid
(every combination):

- ``KEY=V1,V2,...``: any leaf key of the base config (``config.model.fpn_weight_method=sum,attn``;
  the ``config.`` prefix is optional), one arm per value, parsed exactly as ``main.py`` parses
  ``--KEY=V`` (the key's type decides);
- a preset name (``PRESETS``): ``sweep()`` of ``configs/ablations/NAME.py``, whose arms come from
  the model's own enumerations (``models.bifpn.FUSION_METHODS``,
  ``models.efficientnet_config.DROP_CONNECT_VARIANTS``) and whose ``BASELINE`` is the arm the
  others are compared with.

``resolve_arms`` builds every arm's config before anything runs: an unknown key, a value the key's
type rejects, or a value ``config_validation`` rejects stops the sweep with a message naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import itertools
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The named sweeps: configs/ablations/NAME.py, each with ``sweep()`` and ``BASELINE``.
PRESETS = ("drop_connect", "fusion")
# Each run's seed is set by the runner (``--seeds``), never swept.
SEED_KEY = "train.seed"


class SweepError(ValueError):
    """A sweep argument is invalid; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
    """One configuration of the sweep: a label and its overrides (dotted key without ``config.``,
    value as a command-line string)."""

    label: str
    overrides: tuple[tuple[str, str], ...]

    def flags(self) -> list[str]:
        """The overrides as ``main.py`` flags, ``--config.KEY=VALUE``."""
        return [f"--config.{key}={value}" for key, value in self.overrides]

    @property
    def dirname(self) -> str:
        """The label as a folder name."""
        return self.label.replace("/", "_").replace(" ", "_")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The arms (grid order), the baseline arm's label, and the base config file."""

    arms: tuple[Arm, ...]
    baseline: str
    base: str
    extra_flags: tuple[str, ...]  # --set overrides applied to every arm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep arguments ``ablate.py`` and ``cost.py`` share."""
    parser.add_argument("--sweep", action="append", required=True, metavar="PRESET|KEY=V1,V2,...",
                        help=f"a preset ({', '.join(PRESETS)}) or a config key and its values; "
                        "several --sweep make a grid")
    parser.add_argument("--base", default="configs/shapes_long.py",
                        help="base config file (it decides data source, model and run length)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.2],
                        help="drop_connect preset: backbone drop-connect rates")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every arm, e.g. config.train.total_steps=300")
    parser.add_argument("--baseline", default=None,
                        help="arm the others are compared with (default: the preset's, else the first)")
    parser.add_argument("--out", default=None,
                        help="results folder: ablate.py's runs, tables and plots, cost.py's cost.json "
                        "(default experiments/results/<preset or key>)")


def from_command_line(
    args: argparse.Namespace, results_root: pathlib.Path
) -> tuple[Sweep, dict[str, ml_collections.ConfigDict], pathlib.Path]:
    """The sweep of parsed ``add_arguments`` flags, every arm's validated config (``resolve_arms``)
    and the results folder: ``--out``, else ``results_root/<preset>`` for one preset, else
    ``results_root/<last key part>+...``. Raises ``SweepError`` naming a bad flag."""
    spec = from_arguments(args)
    configs = resolve_arms(spec)
    if args.out:
        return spec, configs, pathlib.Path(args.out)
    names = [s if "=" not in s else s.partition("=")[0].rsplit(".", 1)[-1] for s in args.sweep]
    return spec, configs, results_root / "+".join(names)


def from_arguments(args: argparse.Namespace) -> Sweep:
    """The ``Sweep`` of parsed ``add_arguments`` flags (arms not yet validated)."""
    base = str(_base_path(args.base))
    base_config = resolve_config(base, [])
    dimensions, baselines = [], []
    for spec in args.sweep:
        arms, baseline = parse_dimension(spec, base_config, args.rates)
        dimensions.append(arms)
        baselines.append(baseline)
    arms = grid(dimensions)
    labels = [a.label for a in arms]
    if args.baseline is not None:
        baseline = args.baseline
        if baseline not in labels:
            raise SweepError(f"--baseline={baseline!r} is not an arm; the arms are {labels}")
    elif len(dimensions) == 1 and baselines[0] is not None:
        baseline = baselines[0]
    else:
        baseline = labels[0]
    extra = tuple(_set_flag(s, base_config) for s in args.set)
    return Sweep(tuple(arms), baseline, base, extra)


def _base_path(base: str) -> pathlib.Path:
    path, _, arg = base.partition(":")
    for candidate in (pathlib.Path(path), ROOT / path):
        if candidate.is_file():
            return pathlib.Path(str(candidate.resolve()) + (f":{arg}" if arg else ""))
    raise SweepError(f"--base={base!r}: no such config file (relative to here or to {ROOT})")


def _set_flag(spec: str, base_config: ml_collections.ConfigDict) -> str:
    key, sep, value = spec.removeprefix("--").partition("=")
    if not sep:
        raise SweepError(f"--set={spec!r}: expected KEY=VALUE, e.g. config.train.total_steps=300")
    check_key(base_config, _strip(key))
    return f"--config.{_strip(key)}={value}"


def _strip(key: str) -> str:
    return key.strip().removeprefix("config.")


def parse_dimension(spec: str, base_config: ml_collections.ConfigDict,
                    rates: Sequence[float]) -> tuple[list[Arm], str | None]:
    """The arms of one ``--sweep`` argument and its baseline label (presets only)."""
    if "=" not in spec:
        return preset_arms(spec, rates)
    key, _, values = spec.partition("=")
    key = _strip(key)
    check_key(base_config, key)
    if key == SEED_KEY:
        raise SweepError(f"--sweep {spec}: seeds are not swept; use --seeds N (runs seeds 0..N-1)")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(not v for v in items):
        raise SweepError(f"--sweep {spec}: expected comma-separated values, e.g. {key}=a,b")
    if len(set(items)) != len(items):
        raise SweepError(f"--sweep {spec}: a value is repeated")
    return [Arm(v, ((key, v),)) for v in items], None


def preset_arms(name: str, rates: Sequence[float]) -> tuple[list[Arm], str]:
    """``configs/ablations/NAME.py``'s ``sweep()`` as arms, and its ``BASELINE``."""
    if name not in PRESETS:
        raise SweepError(f"--sweep {name!r} is neither a preset ({', '.join(PRESETS)}) nor KEY=V1,V2,...")
    if str(ROOT) not in sys.path:  # configs/ is a folder of the checkout, not of the package
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"configs.ablations.{name}")
    takes_rates = "rates" in inspect.signature(module.sweep).parameters
    arms = module.sweep(rates=rates) if takes_rates else module.sweep()
    return ([Arm(label, tuple((key, _flag_value(v)) for key, v in overrides.items()))
             for label, overrides in arms.items()], module.BASELINE)


def _flag_value(value: Any) -> str:
    return str(value)


def grid(dimensions: Sequence[Sequence[Arm]]) -> list[Arm]:
    """Every combination of one arm per dimension; one dimension keeps its labels, several join
    ``KEY=label`` parts (the last part of each key) with ``,``."""
    if len(dimensions) == 1:
        return list(dimensions[0])
    arms = []
    for combo in itertools.product(*dimensions):
        overrides: dict[str, str] = {}
        for arm in combo:
            for key, value in arm.overrides:
                if key in overrides:
                    raise SweepError(f"config.{key} is swept by two --sweep arguments")
                overrides[key] = value
        label = ",".join(_part_label(a) for a in combo)
        arms.append(Arm(label, tuple(overrides.items())))
    return arms


def _part_label(arm: Arm) -> str:
    if len(arm.overrides) == 1 and arm.overrides[0][1] == arm.label:
        return f"{arm.overrides[0][0].rsplit('.', 1)[-1]}={arm.label}"
    return arm.label


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raises ``SweepError`` unless ``key`` is a leaf (a value, not a section) of ``config``."""
    node: Any = config
    for i, part in enumerate(key.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = list(flatten(config))
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('config.' + c for c in close)}?" if close else ""
            raise SweepError(f"unknown config key config.{key} (no '{part}' in "
                             f"config.{'.'.join(key.split('.')[:i]) or ''}){hint}".replace(".)", ")"))
        node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
        raise SweepError(f"config.{key} is a section, not a value: sweep one of its keys, "
                         f"e.g. config.{key}.{next(iter(node.keys()), '...')}")


def resolve_config(base: str, flags: Sequence[str]) -> ml_collections.ConfigDict:
    """The config ``main.py --config=BASE FLAGS...`` runs with (same parser, ``lock_config``)."""
    from absl import flags as absl_flags
    from ml_collections import config_flags

    argv = ["main.py", f"--config={base}", *flags]
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def resolve_arms(sweep: Sweep) -> dict[str, ml_collections.ConfigDict]:
    """``{label: config}`` of every arm (base, ``--set``, the arm's overrides), each validated by
    ``config_validation.validate_config``; raises ``SweepError`` naming the arm and the problem."""
    from absl import flags as absl_flags

    from effdet_jax.train.config_validation import ConfigError, validate_config

    configs = {}
    for arm in sweep.arms:
        flags = [*sweep.extra_flags, *arm.flags()]
        try:
            config = resolve_config(sweep.base, flags)
            validate_config(config)
        except (ConfigError, absl_flags.Error, ValueError, KeyError, AttributeError) as e:
            raise SweepError(f"arm {arm.label!r} ({' '.join(flags)}): {e}") from None
        configs[arm.label] = config
    return configs


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of ``config`` (JSON-ready values)."""
    items = config.items() if isinstance(config, dict) else config.items()
    flat: dict[str, Any] = {}
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat


# Config keys added after runs were recorded, each with the value that every run recorded before
# it existed had in effect: a stored config without the key reads as that value, so a new key
# does not make finished runs look made with another config, and a changed value still does.
KEYS_ADDED_LATER: dict[str, Any] = {
    # Before config.xla_cpu_opt_preset, XLA:CPU compiled every train step with its default preset.
    "xla_cpu_opt_preset": "default",
}


def with_keys_added_later(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored run's ``flatten`` config with each absent ``KEYS_ADDED_LATER`` key filled in."""
    return {**KEYS_ADDED_LATER, **stored}


def differing_keys(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys of two ``flatten`` dicts whose values differ (or that only one has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
