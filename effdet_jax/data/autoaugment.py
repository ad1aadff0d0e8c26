"""automl's AutoAugment detection policies (v0..v3) and RandAugment, as TF ops inside tf.data.

``distort`` is called by the training pipeline on the decoded uint8 ``[height, width, 3]`` image
and its ``[N, 4]`` boxes, yxyx normalised to the image (before normalisation, flip and scale
jitter, as in automl's dataloader). The policy tables are in ``autoaugment_policies.py``; the ops
in ``augment_ops.py`` (image only) and ``augment_boxes.py`` (boxes).

Level -> argument (automl's ``level_to_arg``; ``L = level / 10``; "+-" = sign drawn per use):

======================== ===========================================================
op                       argument
======================== ===========================================================
AutoContrast, Equalize   none
Posterize                bits ``int(L * 4)``
Solarize                 threshold ``int(L * 256)`` mod 256 (automl compares in uint8)
SolarizeAdd              addition ``int(L * 110)`` (threshold 128)
Color/Contrast/          factor ``L * 1.8 + 0.1``
Brightness/Sharpness
Cutout                   half size ``int(L * 100)`` px
BBox_Cutout              pad fraction ``L * 0.75``
TranslateX/Y_BBox        +- ``L * 250`` px
ShearX/Y_BBox (+_Only)   +- ``L * 0.3``
Rotate_BBox (+_Only)     +- ``L * 30`` degrees
TranslateX/Y_Only_BBoxes +- ``L * 120`` px
Solarize_Only_BBoxes     threshold ``int(L * 256)``
Cutout_Only_BBoxes       half size ``int(L * 50)`` px
Flip/Equalize_Only       none
======================== ===========================================================

Probabilities: a policy step runs with its probability; a ``*_Only_BBoxes`` step always runs and
applies its op to each box with ``probability / 3``. RandAugment draws one op of
``RANDAUGMENT_OPS`` per layer and always applies it at ``magnitude``. Randomness is stateless,
from the ``seed`` argument, so the same seed gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from effdet_jax.data import augment_boxes as B
from effdet_jax.data import augment_ops as O
from effdet_jax.data.autoaugment_policies import (
    MAX_LEVEL,
    POLICIES,
    RANDAUG_LAYERS,
    RANDAUG_MAGNITUDE,
    RANDAUG_POLICY,
    RANDAUGMENT_OPS,
)

# automl's ``augmentation_hparams`` (cutout_bbox_replace_with_mean=False: cutouts fill 128).
TRANSLATE_CONST = 250.0
TRANSLATE_BBOX_CONST = 120.0
CUTOUT_CONST = 100.0
CUTOUT_BBOX_CONST = 50.0
CUTOUT_MAX_PAD_FRACTION = 0.75


def enhance_factor(level: float) -> float:
    """Colour / Contrast / Brightness / Sharpness blend factor: 0.1 at level 0, 1.9 at 10."""
    return level / MAX_LEVEL * 1.8 + 0.1


def _scaled(const: float) -> Callable[[float], float]:
    return lambda level: level / MAX_LEVEL * const


def _truncated(const: float) -> Callable[[float], float]:
    return lambda level: float(int(level / MAX_LEVEL * const))


def _no_arg(level: float) -> float:
    return 0.0


def _signed(value: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """``value`` or ``-value`` with probability 1/2 each."""
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -value, value)


def _int(arg: tf.Tensor) -> tf.Tensor:
    return tf.cast(arg, tf.int32)


# Op signature: (image uint8 [H,W,3], boxes [N,4] normalised yxyx, arg, prob, seed [2] int32)
# -> (image, boxes). ``arg`` comes from the level (``level_to_arg``), computed in Python as automl
# does; ``prob`` is read only by the ``*_Only_BBoxes`` ops. Each op is traced once per process
# and called by reference from every policy step that uses it.
Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
_SIGNATURE = (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([None, 4], tf.float32),
              tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32),
              tf.TensorSpec([2], tf.int32))


def _traced(fn: Op) -> Op:
    return tf.function(fn, input_signature=_SIGNATURE, autograph=False)


def _image_op(fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]) -> Op:
    """An op on the image only (``fn(image, arg, seed)``); boxes pass through."""
    return _traced(lambda image, boxes, arg, prob, seed: (fn(image, arg, seed), boxes))


def _box_op(fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tuple]) -> Op:
    """An op that reads or moves boxes (``fn(image, boxes, arg, seed)``)."""
    return _traced(lambda image, boxes, arg, prob, seed: fn(image, boxes, arg, seed))


def _only_boxes(fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]) -> Op:
    """A ``*_Only_BBoxes`` op: ``fn(region, arg, seed)`` inside each box with probability
    ``prob / 3``; a signed ``arg`` gets one sign per image."""
    def op(image, boxes, arg, prob, seed):
        sign_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        arg = _signed(arg, sign_seed)
        return B.only_boxes(image, boxes, prob, lambda r, s: fn(r, arg, s), box_seed)
    return _traced(op)


def _unsigned_only_boxes(fn: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]) -> Op:
    def op(image, boxes, arg, prob, seed):
        return B.only_boxes(image, boxes, prob, lambda r, s: fn(r, arg, s), seed)
    return _traced(op)


# name -> (level -> argument, op); the table of the module docstring.
OPS: dict[str, tuple[Callable[[float], float], Op]] = {
    "AutoContrast": (_no_arg, _image_op(lambda im, a, s: O.autocontrast(im))),
    "Equalize": (_no_arg, _image_op(lambda im, a, s: O.equalize(im))),
    "Posterize": (_truncated(4), _image_op(lambda im, a, s: O.posterize(im, _int(a)))),
    "Solarize": (_truncated(256), _image_op(lambda im, a, s: O.solarize(im, _int(a)))),
    "SolarizeAdd": (_truncated(110), _image_op(lambda im, a, s: O.solarize_add(im, _int(a)))),
    "Color": (enhance_factor, _image_op(lambda im, a, s: O.color(im, a))),
    "Contrast": (enhance_factor, _image_op(lambda im, a, s: O.contrast(im, a))),
    "Brightness": (enhance_factor, _image_op(lambda im, a, s: O.brightness(im, a))),
    "Sharpness": (enhance_factor, _image_op(lambda im, a, s: O.sharpness(im, a))),
    "Cutout": (_truncated(CUTOUT_CONST), _image_op(lambda im, a, s: O.cutout(im, _int(a), s))),
    "BBox_Cutout": (_scaled(CUTOUT_MAX_PAD_FRACTION), _box_op(B.bbox_cutout)),
    "Rotate_BBox": (_scaled(30.0), _box_op(
        lambda im, bx, a, s: B.rotate_with_boxes(im, bx, _signed(a, s)))),
    "TranslateX_BBox": (_scaled(TRANSLATE_CONST), _box_op(
        lambda im, bx, a, s: B.translate_with_boxes(im, bx, _signed(a, s), horizontal=True))),
    "TranslateY_BBox": (_scaled(TRANSLATE_CONST), _box_op(
        lambda im, bx, a, s: B.translate_with_boxes(im, bx, _signed(a, s), horizontal=False))),
    "ShearX_BBox": (_scaled(0.3), _box_op(
        lambda im, bx, a, s: B.shear_with_boxes(im, bx, _signed(a, s), horizontal=True))),
    "ShearY_BBox": (_scaled(0.3), _box_op(
        lambda im, bx, a, s: B.shear_with_boxes(im, bx, _signed(a, s), horizontal=False))),
    "Rotate_Only_BBoxes": (_scaled(30.0), _only_boxes(lambda r, a, s: O.rotate(r, a))),
    "ShearX_Only_BBoxes": (_scaled(0.3), _only_boxes(lambda r, a, s: O.shear_x(r, a))),
    "ShearY_Only_BBoxes": (_scaled(0.3), _only_boxes(lambda r, a, s: O.shear_y(r, a))),
    "TranslateX_Only_BBoxes": (_scaled(TRANSLATE_BBOX_CONST),
                               _only_boxes(lambda r, a, s: O.translate_x(r, a))),
    "TranslateY_Only_BBoxes": (_scaled(TRANSLATE_BBOX_CONST),
                               _only_boxes(lambda r, a, s: O.translate_y(r, a))),
    "Flip_Only_BBoxes": (_no_arg, _unsigned_only_boxes(
        lambda r, a, s: tf.image.flip_left_right(r))),
    "Solarize_Only_BBoxes": (_truncated(256), _unsigned_only_boxes(
        lambda r, a, s: O.solarize(r, _int(a)))),
    "Equalize_Only_BBoxes": (_no_arg, _unsigned_only_boxes(lambda r, a, s: O.equalize(r))),
    "Cutout_Only_BBoxes": (_truncated(CUTOUT_BBOX_CONST), _unsigned_only_boxes(
        lambda r, a, s: O.cutout(r, _int(a), s))),
}

BOX_ONLY_OPS = frozenset(name for name in OPS if name.endswith("_Only_BBoxes"))


def level_to_arg(name: str, level: float) -> float:
    """automl's argument of op ``name`` at ``level`` (before any random sign)."""
    return OPS[name][0](float(level))


def apply_op(name: str, image: tf.Tensor, boxes: tf.Tensor, level: float, seed: tf.Tensor,
             prob: float = 1.0) -> tuple[tf.Tensor, tf.Tensor]:
    """Op ``name`` at ``level`` (automl's 0..10 scale), applied now. ``prob`` is used only by the
    ``*_Only_BBoxes`` ops (each box with ``prob / 3``). ``image``: uint8 [H,W,3]; ``boxes``:
    [N,4] yxyx normalised; ``seed``: [2] int stateless seed. Unknown names raise ``KeyError``
    naming the known ones."""
    if name not in OPS:
        raise KeyError(f"unknown AutoAugment op {name!r}; known: {sorted(OPS)}")
    to_arg, op = OPS[name]
    return op(image, boxes, tf.constant(to_arg(float(level)), tf.float32),
              tf.constant(prob, tf.float32), tf.cast(seed, tf.int32))


def apply_step(name: str, prob: float, level: float, image: tf.Tensor, boxes: tf.Tensor,
               seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One policy step: the op with probability ``prob`` (``*_Only_BBoxes``: always, each box
    with ``prob / 3``)."""
    gate_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if name in BOX_ONLY_OPS:
        return apply_op(name, image, boxes, level, op_seed, prob)
    if prob <= 0.0:
        return image, boxes
    run = lambda: apply_op(name, image, boxes, level, op_seed)  # noqa: E731
    if prob >= 1.0:
        return run()
    return tf.cond(tf.random.stateless_uniform([], gate_seed) < prob, run, lambda: (image, boxes))


def autoaugment(image: tf.Tensor, boxes: tf.Tensor, policy: str, seed: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """One sub-policy of ``POLICIES[policy]``, drawn uniformly, run step by step."""
    sub_policies = POLICIES[policy]
    choice_seed, steps_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    choice = tf.random.stateless_uniform([], choice_seed, 0, len(sub_policies), tf.int32)

    def branch(steps):
        def run():
            im, bx = image, boxes
            for j, (name, prob, level) in enumerate(steps):
                step_seed = tf.random.experimental.stateless_fold_in(steps_seed, j)
                im, bx = apply_step(name, prob, level, im, bx, step_seed)
            return im, bx
        return run

    return tf.switch_case(choice, [branch(steps) for steps in sub_policies])


def randaugment(image: tf.Tensor, boxes: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """``num_layers`` times: one op of ``RANDAUGMENT_OPS``, drawn uniformly, at ``magnitude``."""
    for layer in range(num_layers):
        layer_seed = tf.random.experimental.stateless_fold_in(seed, layer)
        choice_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
        choice = tf.random.stateless_uniform([], choice_seed, 0, len(RANDAUGMENT_OPS), tf.int32)
        branches = [
            (lambda n=name, im=image, bx=boxes, s=op_seed: apply_op(n, im, bx, magnitude, s))
            for name in RANDAUGMENT_OPS
        ]
        image, boxes = tf.switch_case(choice, branches)
    return image, boxes


def distort(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor, *, policy: str = "",
            randaugment_layers: int = 0, randaugment_magnitude: float = 10
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """AutoAugment ``policy`` (``autoaugment_policies.POLICY_NAMES``: ``""`` off, ``"v0"`` ..
    ``"v3"``, or ``"randaug"`` = RandAugment with 1 layer at magnitude 15, automl's call), then
    ``randaugment_layers`` RandAugment layers at ``randaugment_magnitude``.

    ``image``: uint8 [H,W,3]; ``boxes``: [N,4] float32 yxyx normalised; ``seed``: [2] int32
    stateless seed. Returns the same layouts."""
    policy_seed, rand_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if policy == RANDAUG_POLICY:
        image, boxes = randaugment(image, boxes, RANDAUG_LAYERS, RANDAUG_MAGNITUDE, policy_seed)
    elif policy:
        image, boxes = autoaugment(image, boxes, policy, policy_seed)
    if randaugment_layers:
        image, boxes = randaugment(image, boxes, randaugment_layers, randaugment_magnitude,
                                   rand_seed)
    return image, boxes
