"""The config a workdir's checkpoints were written with: ``WORKDIR/config.json``.

A training run writes its resolved config there (JSON from ml_collections, one key per line, for a
person to read) when the workdir holds no checkpoint yet. A run that resumes compares its own
config with the saved one, key by key (dotted paths, ``model.fpn_weight_method``), before anything
is built, and sorts each difference by ``RESUME_POLICY``:

- ``MUST_MATCH``: the key decides what the saved state means or its shapes (architecture, class
  count and label space, input normalisation, anchors, optimizer kind). The run stops with
  ``ConfigMismatchError`` naming each key and both values, and the two ways out: a new
  ``--workdir``, or a new run started from this one's weights (``--config.init.checkpoint``).
- ``LOGGED``: allowed, and logged as a warning (run length, learning rate, losses, data, image
  size, regularisation, ...); the default for any key the table does not name.
- ``FREE``: how the run is executed or observed (devices, evaluation, logging, checkpoint
  cadence, compute dtype, CPU kernels, compilation cache and XLA:CPU preset); changes silently.

The longest matching prefix in the table decides. After a resume ``config.json`` holds the
current config (every ``MUST_MATCH`` key is unchanged by then). A workdir with checkpoints but no
``config.json`` (written before it existed) is resumed unchecked here; the checkpoint's stored
shapes are still compared with the model's on restore (``checkpointing.check_shapes``).
"""

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

CONFIG_FILE = "config.json"
MUST_MATCH, LOGGED, FREE = "must match", "logged", "free"

RESUME_POLICY: dict[str, str] = {
    "model": MUST_MATCH,
    "model.image_size": LOGGED,
    "model.backbone_drop_connect_rate": LOGGED,
    "model.drop_connect_variant": LOGGED,
    "model.dtype": FREE,
    "model.remat": FREE,
    "model.layer_loop": FREE,
    "model.overrides.image_size": LOGGED,
    "model.overrides.backbone_drop_connect_rate": LOGGED,
    "model.overrides.drop_connect_variant": LOGGED,
    "model.overrides.head_drop_connect_rate": LOGGED,
    "model.overrides.backbone_overrides.dropout_rate": LOGGED,
    "model.overrides.backbone_overrides.drop_connect_rate": LOGGED,
    "model.overrides.backbone_overrides.drop_connect_variant": LOGGED,
    "model.overrides.dtype": FREE,
    "model.overrides.remat": FREE,
    "model.overrides.layer_loop": FREE,
    "model.overrides.cpu_kernels": FREE,
    "data.label_space": MUST_MATCH,
    "train.optimizer": MUST_MATCH,
    "train.freeze": MUST_MATCH,  # frozen parameters have no optimizer state
    "init": FREE,  # a resumed run starts from its own checkpoint, not config.init
    "eval": FREE,
    "mesh": FREE,
    "checkpoint": FREE,
    "log_every_steps": FREE,
    "data.num_parallel_calls": FREE,
    "compilation_cache": FREE,
    "xla_cpu_opt_preset": FREE,
}

# The ``config.model`` placeholders that mean "the model table's value" (None until set).
_MODEL_TABLE_KEYS = ("fpn_weight_method", "backbone_drop_connect_rate", "drop_connect_variant")
_ABSENT = "(not set)"


class ConfigMismatchError(ValueError):
    """A workdir's checkpoints were written with a config whose ``MUST_MATCH`` keys differ from
    the current one; the message names each key, both values and the ways out."""


def policy(key: str) -> str:
    """``RESUME_POLICY`` of a dotted key: its longest matching prefix's, else ``LOGGED``."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RESUME_POLICY:
            return RESUME_POLICY[prefix]
    return LOGGED


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config`` as plain JSON data: references resolved, and the model-table placeholders of
    ``config.model`` filled with the table's values for ``model.name`` (so leaving
    ``fpn_weight_method`` unset and setting it to the table's value compare equal)."""
    from effdet_jax.models.model_config import get_efficientdet_config

    data = json.loads(config.copy_and_resolve_references().to_json_best_effort())
    model = data.get("model", {})
    try:
        table = get_efficientdet_config(model["name"])
    except (KeyError, ValueError):  # an unknown name: config validation names it
        return data
    for key in _MODEL_TABLE_KEYS:
        if key in model and model[key] is None:
            model[key] = getattr(table, key)
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict stays a value (``{}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[tuple]]:
    """``{policy: [(key, saved value, current value), ...]}`` over the flattened configs; a key
    only one side has shows ``"(not set)"`` on the other."""
    a, b = flatten(saved), flatten(current)
    found: dict[str, list[tuple]] = {MUST_MATCH: [], LOGGED: [], FREE: []}
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if old != new:
            found[policy(key)].append((key, old, new))
    return found


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir/checkpoints`` holds a step directory (a name of digits)."""
    path = os.path.join(workdir, "checkpoints")
    return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def check_and_save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before a training run builds anything: compare ``config`` with ``workdir``'s saved config
    when there is a checkpoint to resume (``ConfigMismatchError`` on a ``MUST_MATCH`` key; a
    warning per ``LOGGED`` key), then write ``config`` to ``workdir/config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = resolved(config)
    if has_checkpoint(workdir):
        if not os.path.exists(path):
            logging.warning(
                "%s has checkpoints but no %s (written before it existed): resuming without a "
                "config comparison; the stored shapes are checked on restore", workdir, CONFIG_FILE)
            return
        with open(path) as f:
            found = differences(json.load(f), current)
        if found[MUST_MATCH]:
            raise ConfigMismatchError(_mismatch_message(workdir, found[MUST_MATCH]))
        for key, old, new in found[LOGGED]:
            logging.warning("resuming with config.%s changed: %r -> %r", key, old, new)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        # Written beside, then renamed: another process reading it sees the old or the new file.
        with open(path + ".tmp", "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)


def _mismatch_message(workdir: str, changed: list[tuple]) -> str:
    keys = "\n".join(f"  config.{key}: saved {old!r}, now {new!r}" for key, old, new in changed)
    return (
        f"{workdir} holds checkpoints of a run whose config differs in keys that change what "
        f"the checkpoint means (its saved config is {os.path.join(workdir, CONFIG_FILE)}):\n"
        f"{keys}\n"
        "Either train in a new workdir (--workdir=NEW_DIR), or start a new run from this one's "
        f"weights: --workdir=NEW_DIR --config.init.checkpoint={workdir}"
    )
