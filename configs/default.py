"""Base configuration: EfficientDet-D0 on COCO with google/automl's training recipe.

Every other config file starts from ``get_config()`` here and changes only what differs, so each
default lives in exactly one place. Fields that default to "whatever the model table says" are
typed placeholders (``None`` until set), so ``--config.model.image_size=256`` parses as an int.
"""

import dataclasses

import ml_collections
from ml_collections import config_dict

from effdet_jax.data.config import default_data_config
from effdet_jax.detection.losses import LossConfig
from effdet_jax.detection.postprocess import PostprocessConfig

_PLACEHOLDER_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


def _dataclass_config(instance) -> ml_collections.ConfigDict:
    """A ConfigDict of a frozen dataclass's fields and defaults, so the dataclass stays the one
    place for them; ``None`` defaults become placeholders typed from the annotation."""
    fields = {}
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if value is None:
            type_name = str(field.type).split("|")[0].strip()
            value = config_dict.placeholder(_PLACEHOLDER_TYPES.get(type_name, str))
        fields[field.name] = value
    return ml_collections.ConfigDict(fields)


def get_config() -> ml_collections.ConfigDict:
    """The full default configuration (D0, COCO 2017, 300 epochs at global batch 64)."""
    config = ml_collections.ConfigDict()

    # ---- model: name in the model table plus a few overrides ----
    config.model = ml_collections.ConfigDict()
    config.model.name = "efficientdet-d0"
    # 90 logits, COCO category ids 1..90 mapped to 0..89 (automl's head layout).
    config.model.num_classes = 90
    config.model.image_size = config_dict.placeholder(int)
    config.model.fpn_weight_method = config_dict.placeholder(str)
    config.model.backbone_drop_connect_rate = config_dict.placeholder(float)
    config.model.drop_connect_variant = config_dict.placeholder(str)
    # Compute dtype of activations ("bfloat16" for mixed precision); params and losses stay f32.
    config.model.dtype = "float32"
    # What the backward pass recomputes to save memory: none | blocks | blocks+heads
    # (model_config.REMAT_POLICIES).
    config.model.remat = "none"
    # Repeated blocks: scan (each body compiled once) | unrolled (model_config.LAYER_LOOPS).
    config.model.layer_loop = "scan"
    # Any other field of the model table, e.g. {"fpn_num_filters": 16}; unknown names fail early.
    config.model.overrides = ml_collections.ConfigDict()

    # ---- input pipeline (owned by effdet_jax.data) ----
    config.data = default_data_config()
    # COCO 2017 from tfds in automl's 90-slot label space (logit = category id - 1), so the head
    # and imported automl / effdet checkpoints agree; a COCO-json folder works by setting
    # source="coco_json" and the four {train,eval}_{annotations,images} paths.
    config.data.source = "tfds"
    config.data.tfds_name = "coco/2017"
    config.data.label_space = "coco90"

    # ---- optimisation (automl: SGD 0.9, lr 0.08 per 64 images, 1 epoch warm-up, cosine) ----
    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.batch_size = 64  # global, over all processes and devices
    config.train.num_epochs = 300.0
    config.train.num_examples_per_epoch = 120000  # automl's hparams value for COCO
    config.train.total_steps = config_dict.placeholder(int)  # overrides num_epochs when set
    config.train.optimizer = "sgd"
    config.train.momentum = 0.9
    config.train.learning_rate = 0.08  # per 64 images, scaled linearly with batch_size
    config.train.lr_warmup_init = 0.008  # not scaled, as in automl
    config.train.lr_warmup_epochs = 1.0
    config.train.lr_schedule = "cosine"
    config.train.first_lr_drop_epoch = 200.0  # stepwise schedule only
    config.train.second_lr_drop_epoch = 250.0
    config.train.poly_lr_power = 0.9  # polynomial schedule only
    config.train.clip_gradients_norm = 10.0  # per tensor, then global; 0 disables
    config.train.ema_decay = 0.9998  # 0 disables; warm-up min(decay, (1+t)/(10+t))
    config.train.grad_accum_steps = 1
    config.train.nonfinite_policy = "error"  # or "skip": drop the update and go on
    # Regex over "/"-joined parameter paths (e.g. "^backbone/"): matching parameters, their
    # optimizer state and EMA copies stay unchanged and leave the L2 term. freeze_bn also keeps
    # the running BN statistics of matching layers (training still normalises with batch stats).
    config.train.freeze = ""
    config.train.freeze_bn = False

    # ---- where the weights of a new run come from (effdet_jax/train/initialization.py) ----
    # checkpoint: a whole detector (automl TF1 folder/prefix or TF2 Keras checkpoint, effdet
    # .safetensors / .npz / .pth, automl-named .npz, or another run's WORKDIR, WORKDIR:best,
    # WORKDIR:<step>); also what eval / predict use when the workdir has no checkpoint.
    # backbone: an ImageNet EfficientNet (automl/TF efficientnet-bN checkpoint or a timm
    # tf_efficientnet_* state dict) for the backbone only. use_ema: the EMA copies where a
    # checkpoint has both. A resumed run (workdir with checkpoints) ignores this section.
    config.init = ml_collections.ConfigDict()
    config.init.checkpoint = config_dict.placeholder(str)
    config.init.backbone = config_dict.placeholder(str)
    config.init.use_ema = True

    # ---- losses: the fields of effdet_jax.detection.losses.LossConfig, with its defaults
    # (automl's focal alpha 0.25 / gamma 1.5, Huber delta 0.1, box weight 50, weight decay 4e-5
    # as an L2 term on kernels) ----
    config.loss = _dataclass_config(LossConfig())

    # ---- evaluation ----
    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 8  # global
    config.eval.every_steps = 5000
    config.eval.num_images = config_dict.placeholder(int)  # None: the whole split
    config.eval.use_ema = True
    # Fields of effdet_jax.detection.postprocess.PostprocessConfig (automl's global soft-NMS).
    config.eval.postprocess = _dataclass_config(PostprocessConfig())
    config.eval.num_summary_images = 3  # images with predicted boxes in TensorBoard

    # ---- devices ----
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: all devices not used by `model`
    config.mesh.model = 1
    config.mesh.fsdp = False  # shard large parameters (and their optimizer/EMA copies) on `data`
    config.mesh.shard_min_size = 2**18  # elements; smaller arrays are replicated on both axes

    # ---- export (--mode=export; effdet_jax.export) ----
    config.export = ml_collections.ConfigDict()
    config.export.formats = "stablehlo,onnx"  # subset of export.FORMATS (savedmodel, tflite: make onnx2tf)
    config.export.batch_size = "1"  # a positive integer, or "dynamic" (a symbolic batch)
    config.export.with_nms = True  # boxes / scores / classes / valid after eval.postprocess
    config.export.dtype = "float32"  # the tflite file's: float32, float16 or int8 (others: float32)
    config.export.input_size = ""  # "HxW": images of that size, letterboxed in the graph; "": model's

    # ---- checkpoints and logs ----
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep = 3
    config.checkpoint.keep_best = 1  # by eval AP
    config.checkpoint.async_save = True
    config.log_every_steps = 100
    # Persistent XLA compilation cache: None = $EFFDET_JAX_COMPILATION_CACHE, else
    # ~/.cache/effdet_jax/xla_cache; a directory; or "off" (effdet_jax/train/compile_cache.py).
    config.compilation_cache = config_dict.placeholder(str)
    # XLA:CPU optimisation preset of the train step (effdet_jax/train/compile_options.py):
    # fast_compile | default | fast_runtime; other backends ignore it.
    config.xla_cpu_opt_preset = "fast_compile"
    return config
