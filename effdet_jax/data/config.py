"""``config.data``: every knob of the input pipeline, with defaults and validation.

The network input size is *not* here: it is a model fact (``config.model.image_size`` or similar);
the trainer passes it to the pipeline builders.
"""

from __future__ import annotations

import ml_collections

from effdet_jax.data.autoaugment_policies import POLICY_NAMES as AUTOAUGMENT_POLICIES
from effdet_jax.data.label_map import LABEL_SPACES
from effdet_jax.data.sources import SOURCES

RANDAUGMENT_MAX_MAGNITUDE = 30


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for ``config.data`` (the synthetic shapes set, no download needed).

    Fields:
      source: where examples come from: ``"shapes"`` (synthetic, generated in code),
        ``"tfds"`` (a prepared tfds detection dataset) or ``"coco_json"`` (a folder with a COCO
        ``instances.json`` and the images).
      tfds_name: tfds dataset, e.g. ``"coco/2017"``, ``"voc/2007"``, ``"voc/2012"``; any tfds
        dataset whose features have ``image`` and ``objects/{bbox,label}`` works.
      tfds_data_dir: tfds data dir (``None``: tfds' default, ``~/tensorflow_datasets``).
      train_split / eval_split: split names of the tfds dataset (tfds slicing allowed,
        e.g. ``"train[:10%]"``).
      train_annotations / eval_annotations: COCO json files for ``source="coco_json"``. With
        ``source="tfds"``, ``eval_annotations`` may name the official ground truth of the eval
        split (``instances_val2017.json``): evaluation then scores against it (its ``area``,
        ``iscrowd``, image sizes) instead of boxes rebuilt from the tfds examples, matched by
        ``image/id``.
      eval_image_info: ``source="tfds"`` only: a COCO image-info json (``images`` with ids, e.g.
        ``image_info_test-dev2017.json``); the eval split is restricted to the images it lists
        (test-dev is the part of tfds' ``test`` split it lists). Without ``eval_annotations``
        there is no ground truth: evaluation writes the results file and skips the metrics.
      train_images / eval_images: image folders for ``source="coco_json"``; ``file_name`` in the
        json is relative to them.
      label_space: ``"contiguous"`` (label = index of the category in the sorted id list) or
        ``"coco90"`` (label = category_id - 1, 90 logits, as automl's official checkpoints).
      max_instances_per_image: M, boxes per image in a batch; beyond M the largest M are kept
        (``transforms.pad_to_max``) and the rest counted (``boxes_over_max_dropped``).
      on_bad_data: ``"report"`` (fix or drop bad files and boxes, count them, write
        ``WORKDIR/data_report.json``) or ``"error"`` (stop at start-up naming the first bad file
        and annotation); values in ``data/report.ON_BAD_DATA``.
      skip_crowd_during_training: drop crowd boxes from training examples (as automl);
        ``False`` keeps them with class ``-2``. Eval always keeps them as ``-2``.
      shapes.*: the synthetic set: ``num_train``/``num_eval`` images, ``train_seed``/``eval_seed``,
        ``image_size`` (longest side of generated images, px), ``num_classes`` (1..6),
        ``min_objects``/``max_objects`` per image.
      hflip: random horizontal flip in training.
      jitter_min / jitter_max: scale-jitter range (fraction of the target size) in training.
      autoaugment_policy: ``""`` (off), ``"v0"`` .. ``"v3"`` (automl's AutoAugment detection
        policies) or ``"randaug"`` (automl's RandAugment call: 1 layer, magnitude 15); see
        ``effdet_jax/data/autoaugment.py``. Off in automl's hparams and here.
      randaugment_layers / randaugment_magnitude: extra RandAugment layers after the policy
        (0 layers = off) at a magnitude on automl's 0..10 level scale (up to 30; automl's
        ``"randaug"`` uses 15).
      shuffle_buffer: examples in the shuffle buffer (training).
      seed: base seed of shuffling and augmentation (same seed + step -> same batches).
      num_parallel_calls: tf.data map parallelism (``-1``: AUTOTUNE).
      prefetch: batches prefetched (``-1``: AUTOTUNE).
      cache_eval: cache the decoded, resized eval examples in memory (small eval sets only).
    """
    c = ml_collections.ConfigDict()
    c.source = "shapes"
    c.tfds_name = "coco/2017"
    c.tfds_data_dir = ml_collections.config_dict.placeholder(str)
    c.train_split = "train"
    c.eval_split = "validation"
    c.train_annotations = ""
    c.train_images = ""
    c.eval_annotations = ""
    c.eval_images = ""
    c.eval_image_info = ""
    c.label_space = "contiguous"
    c.max_instances_per_image = 100
    c.skip_crowd_during_training = True
    c.on_bad_data = "report"

    c.shapes = ml_collections.ConfigDict()
    c.shapes.num_train = 2000
    c.shapes.num_eval = 200
    c.shapes.train_seed = 0
    c.shapes.eval_seed = 1
    c.shapes.image_size = 256
    c.shapes.num_classes = 4
    c.shapes.min_objects = 2
    c.shapes.max_objects = 10

    c.hflip = True
    c.jitter_min = 0.1
    c.jitter_max = 2.0
    c.autoaugment_policy = ""
    c.randaugment_layers = 0
    c.randaugment_magnitude = 10

    c.shuffle_buffer = 1024
    c.seed = 0
    c.num_parallel_calls = -1
    c.prefetch = 2
    c.cache_eval = False
    return c


def known_num_classes(config: ml_collections.ConfigDict) -> tuple[int, str] | None:
    """Logits the classification head needs for ``config`` (``config.data``), with the reason,
    where the config alone decides it: the synthetic set, and tfds COCO in either label space.
    ``None`` where only the data can tell (a COCO-json folder's categories, other tfds sets)."""
    if config.source == "shapes":
        return int(config.shapes.num_classes), "config.data.shapes.num_classes"
    if config.source == "tfds" and config.tfds_name.startswith("coco"):
        if config.label_space == "coco90":
            return 90, (f"tfds {config.tfds_name} with label_space='coco90' (logit = COCO "
                        "category id - 1, automl's layout); label_space='contiguous' needs 80")
        return 80, (f"tfds {config.tfds_name} with label_space='contiguous' (80 classes); "
                    "label_space='coco90' needs 90")
    return None


_ALLOWED_KEYS = frozenset(default_data_config().keys())
_SHAPES_KEYS = frozenset(default_data_config().shapes.keys())


def _fail(key: str, value: object, allowed: str) -> None:
    raise ValueError(f"config.data.{key}={value!r} is invalid; allowed: {allowed}")


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ValueError`` naming the first bad key/value of ``config.data`` and the allowed."""
    for key in config.keys():
        if key not in _ALLOWED_KEYS:
            _fail(key, config[key], f"keys {sorted(_ALLOWED_KEYS)}")
    for key in config.shapes.keys():
        if key not in _SHAPES_KEYS:
            _fail(f"shapes.{key}", config.shapes[key], f"keys {sorted(_SHAPES_KEYS)}")
    if config.source not in SOURCES:
        _fail("source", config.source, str(SOURCES))
    if config.label_space not in LABEL_SPACES:
        _fail("label_space", config.label_space, str(LABEL_SPACES))
    if config.autoaugment_policy not in AUTOAUGMENT_POLICIES:
        _fail("autoaugment_policy", config.autoaugment_policy, str(AUTOAUGMENT_POLICIES))
    if config.source == "coco_json":
        for key in ("train_annotations", "train_images", "eval_annotations", "eval_images"):
            if not config[key]:
                _fail(key, config[key], "a path (required when source='coco_json')")
    if config.eval_image_info and config.source != "tfds":
        _fail("eval_image_info", config.eval_image_info,
              "'' unless source='tfds' (for a COCO-json folder, set eval_annotations to the "
              "image-info json itself and eval_images to its image folder)")
    if config.source == "tfds" and not config.tfds_name:
        _fail("tfds_name", config.tfds_name, "a tfds name such as 'coco/2017' or 'voc/2007'")
    if not 1 <= config.max_instances_per_image <= 10000:
        _fail("max_instances_per_image", config.max_instances_per_image, "1..10000")
    if not 0 < config.jitter_min <= config.jitter_max:
        _fail("jitter_min", config.jitter_min,
              f"0 < jitter_min <= jitter_max ({config.jitter_max})")
    if not 0 <= config.randaugment_layers <= 10:
        _fail("randaugment_layers", config.randaugment_layers, "0..10")
    if not 0 <= config.randaugment_magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
        _fail("randaugment_magnitude", config.randaugment_magnitude,
              f"0..{RANDAUGMENT_MAX_MAGNITUDE}")
    if config.autoaugment_policy == "randaug" and config.randaugment_layers:
        _fail("randaugment_layers", config.randaugment_layers,
              "0 with autoaugment_policy='randaug' (which is 1 layer at magnitude 15); for other "
              "layers/magnitude set autoaugment_policy='' and randaugment_layers/_magnitude")
    if config.shuffle_buffer < 1:
        _fail("shuffle_buffer", config.shuffle_buffer, ">= 1")
    if config.num_parallel_calls == 0 or config.num_parallel_calls < -1:
        _fail("num_parallel_calls", config.num_parallel_calls, "-1 (AUTOTUNE) or >= 1")
    if config.prefetch == 0 or config.prefetch < -1:
        _fail("prefetch", config.prefetch, "-1 (AUTOTUNE) or >= 1")
    s = config.shapes
    if not 1 <= s.num_classes <= 6:
        _fail("shapes.num_classes", s.num_classes, "1..6")
    if not 1 <= s.min_objects <= s.max_objects <= 30:
        _fail("shapes.min_objects", s.min_objects, "1 <= min_objects <= max_objects <= 30")
    if s.num_train < 1 or s.num_eval < 1:
        _fail("shapes.num_train", (s.num_train, s.num_eval), "num_train, num_eval >= 1")
    if not 32 <= s.image_size <= 4096:
        _fail("shapes.image_size", s.image_size, "32..4096")
    if s.train_seed == s.eval_seed:
        _fail("shapes.eval_seed", s.eval_seed, f"a seed different from train_seed ({s.train_seed})")
