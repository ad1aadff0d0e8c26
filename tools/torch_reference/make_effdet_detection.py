"""effdet (PyTorch) reference for the detection core: anchors, labeler, loss, hard-NMS post-process.

All inputs are made here from fixed seeds and stored next to effdet's outputs. Layout conventions
of the npz (what the JAX tests read):
  * boxes yxyx input pixels; classes 0-based with -1 for padding / background (effdet itself takes
    1-based gt classes and returns 1-based detection classes; converted here);
  * per-level network outputs NHWC ``[B, H, W, A*K]`` (effdet gets them permuted to NCHW);
  * targets flattened over levels in anchor order ``[B, A]`` / ``[B, A, 4]``.

Keys:
  ``anchors_{a,b}/boxes`` and their configs (``image_hw``, ``anchor_scale``, ``aspect``);
  ``labels/{gt_boxes,gt_classes,cls_targets,box_targets,num_positives}`` (config a, 6 classes);
  ``loss/{cls_L,box_L,cls_targets,box_targets,num_positives}`` with some targets set to -2, and
  ``loss/ls{0,0.1}/{total,cls,box}``;
  ``post/{cls_L,box_L,img_scale}`` and effdet's ``post/{boxes,scores,classes,valid}`` (top 5000
  (anchor, class) pairs, per-class torchvision hard NMS at 0.5, 100 per image, scaled, unclipped).
"""

import types

import numpy as np
import torch
from common import parse_out, save, seed_everything
from effdet.anchors import AnchorLabeler, Anchors
from effdet.bench import _batch_detection, _post_process
from effdet.loss import DetectionLoss

LEVELS = (3, 7)
NUM_CLASSES = 6
CONFIG_A = dict(image_hw=(256, 384), anchor_scale=4.0, aspect=((1.0, 1.0), (1.4, 0.7), (0.7, 1.4)))
# Scalar (w/h) aspects and one anchor scale per level, on a size that is not a multiple of 128.
CONFIG_B = dict(image_hw=(320, 200), anchor_scale=(3.0, 3.5, 4.0, 4.5, 5.0), aspect=(1.0, 2.0, 0.5))


def make_anchors(cfg: dict) -> Anchors:
    aspect = [tuple(a) if isinstance(a, tuple) else a for a in cfg["aspect"]]
    scale = cfg["anchor_scale"]
    scale = list(scale) if isinstance(scale, tuple) else scale
    return Anchors(LEVELS[0], LEVELS[1], 3, aspect, scale, cfg["image_hw"])


def random_gt(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Four images, 12 padded rows: ordinary boxes, no boxes, boxes over the border + tiny + huge,
    and a full image."""
    h, w = hw
    m = 12
    boxes = np.full((4, m, 4), -1.0, np.float32)
    classes = np.full((4, m), -1, np.int32)

    def rand_boxes(n: int) -> np.ndarray:
        y0 = rng.uniform(0, h * 0.8, n)
        x0 = rng.uniform(0, w * 0.8, n)
        bh = rng.uniform(8, h * 0.6, n)
        bw = rng.uniform(8, w * 0.6, n)
        return np.stack([y0, x0, np.minimum(y0 + bh, h), np.minimum(x0 + bw, w)], 1)

    boxes[0, :5] = rand_boxes(5)
    classes[0, :5] = rng.integers(0, NUM_CLASSES, 5)
    special = np.array(
        [
            [-30.0, -20.0, 60.0, 90.0],  # over the top-left corner
            [200.0, 300.0, 300.0, 420.0],  # over the bottom-right corner
            [120.0, 150.0, 123.0, 154.0],  # 3x4: matched by force-match only
            [4.0, 4.0, h - 4.0, w - 4.0],  # almost the whole image
            [68.0, 100.0, 100.0, 132.0],  # equals a P3 anchor: all-zero box targets
            [64.0, 96.0, 104.0, 136.0],  # same center, bigger: zero ty/tx targets only
        ],
        np.float32,
    )
    boxes[2, : len(special)] = special
    classes[2, : len(special)] = np.arange(len(special)) % NUM_CLASSES
    boxes[3] = rand_boxes(m)
    classes[3] = rng.integers(0, NUM_CLASSES, m)
    return boxes, classes


def flat_cls(per_level: list, batch: int) -> np.ndarray:
    """Per-level ``[B, H, W, A]`` -> ``[B, sum H*W*A]`` int32 in anchor order."""
    return torch.cat([t.reshape(batch, -1) for t in per_level], 1).numpy().astype(np.int32)


def flat_box(per_level: list, batch: int) -> np.ndarray:
    """Per-level ``[B, H, W, A*4]`` -> ``[B, sum H*W*A, 4]`` in anchor order."""
    return torch.cat([t.reshape(batch, -1, 4) for t in per_level], 1).numpy()


def level_outputs(rng, anchors: Anchors, batch: int, channels: int, loc: float, scale: float):
    return [
        (rng.standard_normal((batch, h, w, channels)) * scale + loc).astype(np.float32)
        for h, w in anchors.feat_sizes[LEVELS[0] : LEVELS[1] + 1]
    ]


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    out = parse_out()
    seed_everything(0)
    rng = np.random.default_rng(2024)
    arrays = {}

    for name, cfg in (("anchors_a", CONFIG_A), ("anchors_b", CONFIG_B)):
        arrays[f"{name}/boxes"] = make_anchors(cfg).boxes.numpy()
        arrays[f"{name}/image_hw"] = np.array(cfg["image_hw"], np.int32)
        arrays[f"{name}/anchor_scale"] = np.atleast_1d(np.array(cfg["anchor_scale"], np.float64))
        arrays[f"{name}/aspect"] = np.array(cfg["aspect"], np.float64)

    anchors = make_anchors(CONFIG_A)
    num_a = anchors.get_anchors_per_location()
    labeler = AnchorLabeler(anchors, NUM_CLASSES, match_threshold=0.5)
    gt_boxes, gt_classes = random_gt(rng, CONFIG_A["image_hw"])
    batch = gt_boxes.shape[0]
    # effdet wants 1-based classes and drops rows with class <= -1.
    effdet_classes = np.where(gt_classes >= 0, gt_classes + 1, -1)
    cls_t, box_t, num_pos = labeler.batch_label_anchors(
        torch.from_numpy(gt_boxes), torch.from_numpy(effdet_classes)
    )
    arrays["labels/gt_boxes"] = gt_boxes
    arrays["labels/gt_classes"] = gt_classes
    arrays["labels/cls_targets"] = flat_cls(cls_t, batch)
    arrays["labels/box_targets"] = flat_box(box_t, batch)
    arrays["labels/num_positives"] = num_pos.numpy().astype(np.float32)

    # Loss on random outputs; a few anchors of image 0 are marked ignore (-2), which effdet masks.
    cls_out = level_outputs(rng, anchors, batch, num_a * NUM_CLASSES, -3.0, 2.0)
    box_out = level_outputs(rng, anchors, batch, num_a * 4, 0.0, 0.3)
    cls_t = [t.clone() for t in cls_t]
    ignore = cls_t[0].reshape(batch, -1)
    ignore[0, rng.choice(ignore.shape[1], 300, replace=False)] = -2
    for lvl in range(len(cls_out)):
        arrays[f"loss/cls_{lvl + LEVELS[0]}"] = cls_out[lvl]
        arrays[f"loss/box_{lvl + LEVELS[0]}"] = box_out[lvl]
    arrays["loss/cls_targets"] = flat_cls(cls_t, batch)
    arrays["loss/box_targets"] = flat_box(box_t, batch)
    arrays["loss/num_positives"] = num_pos.numpy().astype(np.float32)
    for ls in (0.0, 0.1):
        config = types.SimpleNamespace(
            num_classes=NUM_CLASSES, alpha=0.25, gamma=1.5, delta=0.1, box_loss_weight=50.0,
            label_smoothing=ls, legacy_focal=False, jit_loss=False,
        )
        with torch.no_grad():
            total, cls_loss, box_loss = DetectionLoss(config)(
                [nchw(x) for x in cls_out], [nchw(x) for x in box_out], cls_t, box_t, num_pos
            )
        arrays[f"loss/ls{ls}/total"] = np.float32(total.item())
        arrays[f"loss/ls{ls}/cls"] = np.float32(cls_loss.item())
        arrays[f"loss/ls{ls}/box"] = np.float32(box_loss.item())

    # Post-processing: peaked logits so that NMS has real work.
    post_batch = 2
    cls_out = level_outputs(rng, anchors, post_batch, num_a * NUM_CLASSES, -6.0, 1.5)
    box_out = level_outputs(rng, anchors, post_batch, num_a * 4, 0.0, 0.2)
    img_scale = np.array([1.0, 2.5], np.float32)
    with torch.no_grad():
        cls_top, box_top, indices, classes = _post_process(
            [nchw(x) for x in cls_out], [nchw(x) for x in box_out],
            num_levels=len(cls_out), num_classes=NUM_CLASSES, max_detection_points=5000,
        )
        det = _batch_detection(
            post_batch, cls_top, box_top, anchors.boxes, indices, classes,
            torch.from_numpy(img_scale), None, max_det_per_image=100, soft_nms=False,
        ).numpy()
    for lvl in range(len(cls_out)):
        arrays[f"post/cls_{lvl + LEVELS[0]}"] = cls_out[lvl]
        arrays[f"post/box_{lvl + LEVELS[0]}"] = box_out[lvl]
    arrays["post/img_scale"] = img_scale
    valid = det[..., 4] > 0  # effdet pads with all-zero rows; real scores are sigmoids > 0
    arrays["post/boxes"] = det[..., [1, 0, 3, 2]].astype(np.float32)
    arrays["post/scores"] = det[..., 4].astype(np.float32)
    arrays["post/classes"] = np.where(valid, det[..., 5] - 1, -1).astype(np.int32)
    arrays["post/valid"] = valid.sum(1).astype(np.int32)
    save(out, arrays)


if __name__ == "__main__":
    main()
