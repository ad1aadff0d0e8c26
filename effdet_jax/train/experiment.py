"""Everything built from a config before the first step: mesh, model, loss, optimizer, shardings,
and the jitted ``init`` / ``train_step`` / ``detect`` functions.

Kept apart from the loop (``trainer.py``) so tests and notebooks can build an experiment and call
its pieces directly. Nothing here touches the input pipeline or the filesystem.

The pieces built here from ``config`` sections:

- ``config.model`` -> the flax module (``build_model``; ``model_overrides`` are the set fields);
- ``config.loss`` -> ``make_loss_fn``: targets assigned on device from the ground truth, then the
  detection losses and the L2 term (``effdet_jax.detection``; the losses cast outputs to float32
  themselves, so bfloat16 models keep float32 losses);
- ``config.eval.postprocess`` -> ``make_detect_fn``: the forward pass in inference mode, then
  automl's post-processing on device (candidates, decode, NMS), so only ``max_detections`` boxes
  per image ever reach the host.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from effdet_jax.detection import anchors, losses, targets
from effdet_jax.detection.postprocess import PostprocessConfig, postprocess
from effdet_jax.models.efficientdet import efficientdet
from effdet_jax.train import compile_options, optimizer
from effdet_jax.train import mesh as mesh_lib
from effdet_jax.train.train_step import (
    TRAIN_KEYS,
    StepOptions,
    TrainState,
    create_train_state,
    make_train_step,
)

LossFn = Callable[[list, list, dict, Any], tuple[jax.Array, dict[str, jax.Array]]]

# ``init`` runs once, so its speed is irrelevant, but XLA's optimisation passes over the hundreds
# of threefry initialisers take minutes on a CPU: compile it at -O0.
INIT_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def model_overrides(model_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword overrides for ``get_efficientdet_config``: the set fields of ``config.model``.

    ``name`` and ``num_classes`` are passed separately; unset placeholders (``None``) mean "use the
    model table's value" and are left out.
    """
    overrides = {
        key: model_cfg[key]
        for key in (
            "image_size", "fpn_weight_method", "backbone_drop_connect_rate", "drop_connect_variant"
        )
        if model_cfg[key] is not None
    }
    overrides["dtype"] = model_cfg.dtype
    overrides["remat"] = model_cfg.remat
    overrides["layer_loop"] = model_cfg.layer_loop
    overrides.update(model_cfg.overrides.to_dict())
    return overrides



def input_normalization(
    model_cfg: ml_collections.ConfigDict,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean_rgb, stddev_rgb)`` of ``config.model``: the model table's normalisation for its
    name (ImageNet for D0-D7x, 127 / 128 for lite), or ``config.model.overrides`` where set."""
    from effdet_jax.models.model_config import get_efficientdet_config

    overrides = model_overrides(model_cfg)
    return get_efficientdet_config(model_cfg.name, **overrides).normalization

def build_model(model_cfg: ml_collections.ConfigDict) -> Any:
    """The flax module for ``config.model`` (``model.config`` is its frozen model config)."""
    return efficientdet(
        model_cfg.name, num_classes=model_cfg.num_classes, **model_overrides(model_cfg)
    )


def anchors_for(model_config: Any) -> jax.Array:
    """[num_anchors, 4] yxyx pixel anchors for a model config (level, y, x, anchor order)."""
    return jnp.asarray(anchors.generate_anchors(model_config.anchor_config()))


def make_loss_fn(model_config: Any, loss_cfg: ml_collections.ConfigDict, num_classes: int) -> LossFn:
    """``loss_fn(cls_outputs, box_outputs, batch, params) -> (total, parts)``.

    ``cls_outputs``/``box_outputs`` are the model's per-level lists; ``batch`` holds ``boxes``
    [B, M, 4] yxyx pixels and ``classes`` [B, M] int32 (0-based, -1 padding, -2 crowd). Targets
    are assigned on device, inside the jitted step. ``total`` includes the L2 term on ``params``'
    kernels; ``parts`` are ``detection.losses.detection_loss``'s (``cls_loss``, ``box_loss``,
    ``box_iou_loss``, ``det_loss``, ``reg_l2_loss``, ``num_positives_sum``).
    """
    anchor_boxes = anchors_for(model_config)
    config = losses.LossConfig(**loss_cfg.to_dict())

    def loss_fn(cls_outputs, box_outputs, batch, params):
        tgt = targets.assign_targets(batch["boxes"], batch["classes"], anchor_boxes, num_classes)
        return losses.detection_loss(
            cls_outputs, box_outputs, tgt, anchor_boxes, config, params=params
        )

    return loss_fn


def make_detect_fn(
    model: Any, model_config: Any, postprocess_cfg: ml_collections.ConfigDict
) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
    """``detect(variables, images) -> detections`` (pure; jit it).

    ``variables``: {"params", "batch_stats"}; ``images``: [B, S, S, 3] float32 normalised like
    training. Returns ``boxes`` [B, D, 4] yxyx in *network-input* pixels (multiply by a batch's
    ``image_scale`` for original pixels), ``scores`` [B, D], ``classes`` [B, D] int32 0-based
    (-1 on padding rows) and ``valid`` [B] int32, D = ``max_detections``.
    """
    anchor_boxes = anchors_for(model_config)
    config = PostprocessConfig(**postprocess_cfg.to_dict())

    def detect(variables, images):
        cls_out, box_out = model.apply(variables, images, train=False)
        return postprocess(
            cls_out, box_out, anchor_boxes, model_config.image_size, None, config
        )

    return detect


@dataclasses.dataclass
class Experiment:
    """The built pieces of a run (see module docstring). ``state_shardings`` mirrors TrainState."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    detect: Callable[[Any, jax.Array], dict]

    @property
    def model_config(self):
        return self.model.config

    @property
    def image_size(self) -> int:
        size = self.model.config.image_size
        return int(size if isinstance(size, int) else size[0])

    def init_state(self) -> TrainState:
        """A fresh, sharded train state from ``config.train.seed``."""
        return self.init(jax.random.PRNGKey(self.config.train.seed))

    def eval_variables(self, state: TrainState) -> dict:
        """The variables evaluation uses: the EMA copies unless ``eval.use_ema`` is off."""
        if self.config.eval.use_ema and self.config.train.ema_decay > 0:
            return {"params": state.ema_params, "batch_stats": state.ema_batch_stats}
        return {"params": state.params, "batch_stats": state.batch_stats}


def build_experiment(
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    model: Any = None,
) -> Experiment:
    """Builds the mesh (unless given), the model, and jits ``init``/``train_step``/``detect``.

    Nothing is compiled yet: the first call of each function compiles it.
    """
    mesh = mesh_lib.make_mesh(config.mesh) if mesh is None else mesh
    model = build_model(config.model) if model is None else model
    model_config = model.config
    image_size = model_config.image_size
    image_size = int(image_size if isinstance(image_size, int) else image_size[0])

    schedule = optimizer.learning_rate_schedule(config.train)
    tx = optimizer.make_optimizer(config.train)
    init_fn = functools.partial(create_train_state, model, tx, image_size=image_size)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    state_sh = mesh_lib.state_shardings(
        abstract_state, mesh, fsdp=config.mesh.fsdp, shard_min_size=config.mesh.shard_min_size
    )
    batch_sh = mesh_lib.batch_sharding(mesh)
    repl = mesh_lib.replicated(mesh)

    step_fn = make_train_step(
        model,
        tx,
        make_loss_fn(model_config, config.loss, config.model.num_classes),
        schedule,
        StepOptions(
            ema_decay=config.train.ema_decay,
            grad_accum_steps=config.train.grad_accum_steps,
            freeze=config.train.freeze,
            freeze_bn=config.train.freeze_bn,
        ),
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_sh, {k: batch_sh for k in TRAIN_KEYS}),
        out_shardings=(state_sh, repl),
        donate_argnums=(0,),
        compiler_options=compile_options.train_step_compiler_options(
            config.xla_cpu_opt_preset, mesh.devices.flat),
    )
    detect_fn = make_detect_fn(model, model_config, config.eval.postprocess)
    variables_sh = {"params": state_sh.params, "batch_stats": state_sh.batch_stats}
    detect = jax.jit(detect_fn, in_shardings=(variables_sh, batch_sh), out_shardings=batch_sh)
    return Experiment(
        config=config,
        mesh=mesh,
        model=model,
        tx=tx,
        schedule=schedule,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init=jax.jit(init_fn, out_shardings=state_sh, compiler_options=INIT_COMPILER_OPTIONS),
        train_step=train_step,
        detect=detect,
    )

