"""COCO evaluation (pycocotools) and the report of one evaluation (``report``)."""

from effdet_jax.evaluation.coco_metrics import METRIC_NAMES, ClassAP, CocoEvaluator, yxyx_to_xywh

__all__ = ["METRIC_NAMES", "ClassAP", "CocoEvaluator", "yxyx_to_xywh"]
