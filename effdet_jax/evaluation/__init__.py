"""COCO evaluation (pycocotools)."""

from effdet_jax.evaluation.coco_metrics import METRIC_NAMES, CocoEvaluator, yxyx_to_xywh

__all__ = ["METRIC_NAMES", "CocoEvaluator", "yxyx_to_xywh"]
