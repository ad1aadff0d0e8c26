"""``config.init``: the weights a new run, an evaluation or a prediction starts from.

``initial_state(exp)`` is the one entry point (train, eval and predict call it): a fresh state
from ``config.train.seed``, with ``config.init.checkpoint`` (a whole detector) or
``config.init.backbone`` (an ImageNet EfficientNet, backbone only) loaded over it.

Order of work: the file is read (``checkpoint_files.read``), converted to this project's variable
names for the configured architecture and matched against the model's variable shapes; only
then is the fresh state compiled and the loaded values placed into it. A missing, unknown,
truncated or foreign file therefore fails before any compilation, and nothing is half-loaded.

Matching rules (whole detector):

- every model variable must come from the checkpoint with its shape, except the class head's
  (``params/class_net/predict/...``) when ``model.num_classes`` differs from the checkpoint's:
  those keep their fresh initialisation (the prior bias ``-log((1 - 0.01) / 0.01)``);
- any other mismatch, missing or extra variable is an error naming the variable.

Backbone only: every ``params|batch_stats/backbone/...`` variable must come from the file; the
BiFPN and heads keep their fresh initialisation, and the classifier's own layers (head conv,
classifier) are listed as unused.

One table is logged: loaded, re-initialised and unused names with shapes. The EMA copies start
equal to the loaded weights; the optimizer state starts fresh (zero momentum).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from effdet_jax.convert.automl import automl_name_table, convert_automl_arrays
from effdet_jax.convert.common import CheckpointMismatchError
from effdet_jax.convert.effdet import load_effdet_state_dict
from effdet_jax.convert.timm import efficientnet_assignments
from effdet_jax.models.efficientdet import EfficientDet
from effdet_jax.models.layout import is_unrolled_layout, model_groups, to_stacked, to_unrolled
from effdet_jax.train import checkpoint_files, console
from effdet_jax.train.checkpoint_files import CheckpointFile, CheckpointFileError

# Variables under this prefix change shape with ``model.num_classes``; they are re-initialised
# when the checkpoint's class count differs.
CLASS_HEAD = ("params", "class_net", "predict")
_PREDICT_BIAS = {
    "automl_tf1": "class_net/class-predict/bias",
    "automl_tf2": "class_net/classes/bias",
    "effdet": "class_net.predict.conv_pw.bias",
    "effdet_jax": "params/class_net/predict/bias",
}


class InitError(CheckpointFileError):
    """``config.init`` names a checkpoint that cannot be used; the message names the key, the file
    and the cause."""


class NoCheckpointError(FileNotFoundError):
    """Evaluation or prediction found neither a workdir checkpoint nor ``config.init.checkpoint``."""


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """What ``config.init`` puts into a fresh state, decided before anything is compiled.

    ``loaded``: flat path (collection first, e.g. ``("params", "backbone", "stem_conv",
    "kernel")``) -> array. ``reinitialised``: path -> (model shape, reason). ``unused``: source
    name -> shape.
    """

    key: str
    source: CheckpointFile
    loaded: dict[tuple[str, ...], np.ndarray]
    reinitialised: dict[tuple[str, ...], tuple[tuple[int, ...], str]]
    unused: dict[str, tuple[int, ...]]

    def table(self) -> str:
        """The log table: one row per variable, loaded first, then re-initialised, then unused."""
        rows = [("loaded", "/".join(p), str(tuple(v.shape)), "") for p, v in self.loaded.items()]
        rows += [("re-initialised", "/".join(p), str(shape), why)
                 for p, (shape, why) in self.reinitialised.items()]
        rows += [("unused", name, str(shape), "") for name, shape in self.unused.items()]
        width = max((len(r[1]) for r in rows), default=4)
        lines = [
            f"config.{self.key}={self.source.path} ({self.source.description}): "
            f"{len(self.loaded)} loaded, {len(self.reinitialised)} re-initialised, "
            f"{len(self.unused)} unused",
            f"{'status':<15} {'name':<{width}} shape",
        ]
        lines += [f"{s:<15} {n:<{width}} {shape}{'  ' + why if why else ''}"
                  for s, n, shape, why in rows]
        return "\n".join(lines)


def _target_shapes(abstract_state: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    tree = {"params": abstract_state.params, "batch_stats": abstract_state.batch_stats}
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(tree).items()}


def _model_with_classes(model_cfg: ml_collections.ConfigDict, num_classes: int) -> EfficientDet:
    from effdet_jax.train.experiment import build_model

    cfg = model_cfg.copy_and_resolve_references()
    cfg.num_classes = num_classes
    return build_model(cfg)


def _checkpoint_classes(ckpt: CheckpointFile, num_anchors: int, key: str) -> int:
    name = _PREDICT_BIAS.get(ckpt.naming)
    if name is None or name not in ckpt.arrays:
        hint = " (use config.init.backbone for an ImageNet classifier)" if ckpt.naming == "timm" else ""
        raise InitError(f"config.{key}={ckpt.path}: the {ckpt.description} holds no detector class "
                        f"head ({name or 'class_net/.../predict bias'} is absent){hint}")
    size = int(np.shape(ckpt.arrays[name])[0])
    if size % num_anchors:
        raise InitError(f"config.{key}={ckpt.path}: class head {name} has {size} outputs, not a "
                        f"multiple of the model's {num_anchors} anchors per location")
    return size // num_anchors


def _detector_variables(ckpt: CheckpointFile, model_cfg: ml_collections.ConfigDict, key: str,
                        num_anchors: int) -> dict[tuple[str, ...], np.ndarray]:
    """The checkpoint as this project's flat variables, for the configured architecture with the
    checkpoint's own class count."""
    if ckpt.naming == "effdet_jax":
        flat = {tuple(n.split("/")): v for n, v in ckpt.arrays.items()}
        groups = model_groups(_model_with_classes(model_cfg, model_cfg.num_classes).config)
        if is_unrolled_layout(flat, groups):  # a run from before the scanned blocks
            logging.info("config.%s=%s: unrolled (pre-scan) layout, stacked for this model",
                         key, ckpt.path)
            try:
                flat = traverse_util.flatten_dict(
                    to_stacked(traverse_util.unflatten_dict(flat), groups))
            except ValueError as e:
                raise InitError(f"config.{key}={ckpt.path}: the {ckpt.description} is in the "
                                f"unrolled (pre-scan) layout and does not fit config.model: {e}") from None
        return flat
    num_classes = _checkpoint_classes(ckpt, num_anchors, key)
    model = _model_with_classes(model_cfg, num_classes)
    try:
        if ckpt.naming in ("automl_tf1", "automl_tf2"):
            style = "tf1" if ckpt.naming == "automl_tf1" else "tf2"
            variables = convert_automl_arrays(ckpt.arrays, model, style, set(ckpt.ignored))
        else:
            from effdet_jax.train.experiment import model_overrides

            variables = load_effdet_state_dict(
                {k: v for k, v in ckpt.arrays.items() if k not in ckpt.ignored},
                model_cfg.name, num_classes, **model_overrides(model_cfg))
    except CheckpointMismatchError as e:
        raise InitError(
            f"config.{key}={ckpt.path}: the {ckpt.description} does not fit config.model "
            f"(name={model_cfg.name!r}); is it a checkpoint of another model or variant?\n{e}"
        ) from None
    return traverse_util.flatten_dict(variables)


def _plan_detector(ckpt: CheckpointFile, config: ml_collections.ConfigDict, target: dict,
                   num_anchors: int) -> InitPlan:
    key = "init.checkpoint"
    flat = _detector_variables(ckpt, config.model, key, num_anchors)
    loaded, reinit, problems = {}, {}, []
    for path, shape in target.items():
        value = flat.get(path)
        name = "/".join(path)
        if value is None:
            problems.append(f"{name} {shape}: not in the checkpoint")
        elif tuple(value.shape) == shape:
            loaded[path] = value
        elif path[: len(CLASS_HEAD)] == CLASS_HEAD:
            reinit[path] = (shape, f"checkpoint {tuple(value.shape)}: model.num_classes differs")
        else:
            problems.append(f"{name}: shape {tuple(value.shape)} in the checkpoint, {shape} in the model")
    extra = sorted("/".join(p) for p in flat if p not in target)
    if extra:
        problems.append(f"{len(extra)} checkpoint variable(s) the model does not have: {extra[:10]}")
    if problems:
        raise InitError(
            f"config.{key}={ckpt.path}: the {ckpt.description} does not fit config.model "
            f"(name={config.model.name!r}, num_classes={config.model.num_classes}); is it a "
            "checkpoint of another model or variant?\n- " + "\n- ".join(problems[:20])
        )
    return InitPlan(key, ckpt, loaded, reinit, {})


def _backbone_assignments(ckpt: CheckpointFile, model: EfficientDet) -> dict:
    """Target path -> (source name, array or None) for the backbone variables."""
    if ckpt.naming in ("timm", "effdet"):
        prefix = "backbone." if ckpt.naming == "effdet" else ""
        return efficientnet_assignments(model.config.backbone_config(), ckpt.arrays, prefix=prefix,
                                        target_prefix=("backbone",), features_only=True)
    if ckpt.naming in ("automl_tf1", "automl_tf2"):
        column = 0 if ckpt.naming == "automl_tf1" else 1
        out = {}
        for path, names in automl_name_table(model).items():
            if path[1] != "backbone":
                continue
            value = ckpt.arrays.get(names[column])
            if value is not None and names[2] == "depthwise":
                value = np.ascontiguousarray(np.transpose(value, (0, 1, 3, 2)))
            out[path] = (names[column], value)
        return out
    raise InitError(f"config.init.backbone={ckpt.path}: a {ckpt.description}; expected an "
                    "EfficientNet (automl/TF efficientnet-bN checkpoint or timm state dict)")


def _plan_backbone(ckpt: CheckpointFile, config: ml_collections.ConfigDict, target: dict,
                   model: EfficientDet) -> InitPlan:
    key = "init.backbone"
    assignments = _backbone_assignments(ckpt, model)
    groups = model_groups(model.config)
    # The name tables speak of the unrolled layout: match there, then stack what was loaded.
    unrolled_target = {
        p: tuple(v.shape) for p, v in traverse_util.flatten_dict(to_unrolled(
            traverse_util.unflatten_dict(
                {p: jax.ShapeDtypeStruct(shape, np.float32) for p, shape in target.items()}),
            groups)).items()
    }
    loaded, problems, used = {}, [], set()
    for path, shape in unrolled_target.items():
        if path[1] != "backbone":
            continue
        name, value = assignments.get(path, ("(no source name)", None))
        if value is None:
            problems.append(f"{'/'.join(path)} {shape}: {name} is not in the file")
        elif tuple(np.shape(value)) != shape:
            problems.append(f"{'/'.join(path)}: {name} has shape {tuple(np.shape(value))}, the "
                            f"model {shape}")
        else:
            loaded[path] = np.asarray(value)
            used.add(name)
    if problems:
        expected = model.config.backbone_name
        raise InitError(
            f"config.{key}={ckpt.path}: the {ckpt.description} does not fit the backbone of "
            f"{config.model.name!r} ({expected}); is it another EfficientNet variant? (file names "
            f"like {sorted(ckpt.arrays)[:3]})\n- " + "\n- ".join(problems[:20])
        )
    loaded = traverse_util.flatten_dict(to_stacked(traverse_util.unflatten_dict(loaded), groups))
    reinit = {p: (s, "fresh (not in a backbone checkpoint)") for p, s in target.items()
              if p[1] != "backbone"}
    unused = {n: tuple(np.shape(v)) for n, v in sorted(ckpt.arrays.items())
              if n not in used and n not in ckpt.ignored}
    return InitPlan(key, ckpt, loaded, reinit, unused)


def plan(config: ml_collections.ConfigDict, model: EfficientDet, abstract_state: Any) -> InitPlan | None:
    """Reads and checks ``config.init``'s file against the model; None when ``config.init`` is
    empty. Raises ``InitError`` (or ``CheckpointFileError``) naming the file and the cause."""
    init = config.init
    if init.checkpoint and init.backbone:
        raise InitError(
            f"config.init.checkpoint={init.checkpoint!r} and config.init.backbone="
            f"{init.backbone!r} are both set: a whole-detector checkpoint already has a backbone; "
            "set one of them"
        )
    spec = init.checkpoint or init.backbone
    if not spec:
        return None
    key = "init.checkpoint" if init.checkpoint else "init.backbone"
    try:
        ckpt = checkpoint_files.read(spec, use_ema=init.use_ema)
    except CheckpointFileError as e:
        raise InitError(f"config.{key}: {e}") from None
    target = _target_shapes(abstract_state)
    if init.checkpoint:
        return _plan_detector(ckpt, config, target, model.config.num_anchors)
    return _plan_backbone(ckpt, config, target, model)


def apply(state: Any, init_plan: InitPlan) -> Any:
    """``state`` with the plan's arrays in ``params`` / ``batch_stats`` and in their EMA copies,
    each placed with the sharding of the leaf it replaces."""

    def put(collection: str):
        def leaf(path, old):
            value = init_plan.loaded.get((collection, *(str(getattr(k, "key", k)) for k in path)))
            if value is None:
                return old
            return jax.device_put(np.asarray(value, dtype=old.dtype), old.sharding)

        return leaf

    def load(collection, tree):
        return jax.tree_util.tree_map_with_path(put(collection), tree)

    return state.replace(
        params=load("params", state.params),
        batch_stats=load("batch_stats", state.batch_stats),
        ema_params=load("params", state.ema_params),
        ema_batch_stats=load("batch_stats", state.ema_batch_stats),
    )


def _loaded_state(exp: Any, init_plan: InitPlan) -> Any:
    """The state of a plan that loads every variable, without compiling the initialisers (minutes
    for a large model on a CPU): the same state as ``apply(exp.init_state(), init_plan)``."""
    from effdet_jax.train.train_step import state_from_variables

    def place(collection, abstract):
        def leaf(path, a):
            value = init_plan.loaded[(collection, *(str(getattr(k, "key", k)) for k in path))]
            return np.asarray(value, dtype=a.dtype)

        return jax.tree_util.tree_map_with_path(leaf, abstract)

    params = place("params", exp.abstract_state.params)
    stats = place("batch_stats", exp.abstract_state.batch_stats)
    train_rng = jax.random.split(jax.random.PRNGKey(exp.config.train.seed))[1]
    make = jax.jit(lambda p, b, r: state_from_variables(exp.tx, p, b, r), out_shardings=exp.state_shardings)
    return make(params, stats, train_rng)


def initial_state(exp: Any) -> Any:
    """The state a new run (or an evaluation without checkpoints) starts from: fresh from
    ``config.train.seed``, with ``config.init``'s weights loaded over it (see module docstring).
    The file is read and checked before anything is compiled; when the file gives every
    variable, the initialisers are not compiled at all."""
    init_plan = plan(exp.config, exp.model, exp.abstract_state)
    if init_plan is None:
        return exp.init_state()
    table = init_plan.table()
    logging.info("%s", table)
    # The console gets the summary and the re-initialised rows; the whole table is in the log file.
    summary = [line for line in table.splitlines()[2:] if line.startswith("re-initialised")]
    console.say("%s", "\n".join([table.splitlines()[0], *summary]))
    if not init_plan.reinitialised:
        return _loaded_state(exp, init_plan)
    return apply(exp.init_state(), init_plan)
