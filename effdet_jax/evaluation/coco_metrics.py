"""COCO detection metrics through pycocotools, for any dataset of this package.

One code path for every source: the ground truth is a COCO json when there is one (a COCO-json
folder's annotations, or the official ``instances_val2017.json`` given to a tfds run through
``config.data.eval_annotations``), else it is built from the eval batches (``add_groundtruth``).
With a json, AP and APs/APm/APl use its ``area`` (COCO's segment areas), ``iscrowd`` and image
sizes exactly as the official evaluation does; built ground truth has box areas instead.
A json's annotations go through ``box_rules.sanitize_coco_dataset`` first, the rule the training
pipeline applies to the same boxes: malformed boxes are left out and counted (``gt_report``),
inverted or out-of-image boxes are fixed, crowd boxes stay as crowd, and a clean json passes
through unchanged. A json without an ``annotations`` list (an image-info json such as
``image_info_test-dev2017.json``), or ground truth without a single box, has nothing to score:
``evaluate`` returns no metrics and says why (``skipped``), and the detections are still there
for a results file.

Detections are collected per batch in original-image pixels (clipped to the image when its size
is known), written as a COCO results json (``[{image_id, category_id, bbox: [x, y, w, h],
score}]``, dataset category ids; a detection in a head slot without a category, such as the
unused slots of automl's 90-slot layout, is left out and counted), and scored with ``COCOeval``
on the images that were fed (``image_id == -1`` is skipped). ``class_rows`` holds per-category
AP, AP50, AP75, APs, APm, APl from ``COCOeval.eval["precision"]`` after ``evaluate``.

Multi-host: COCO AP does not decompose over shards; gather every process' detections (and built
ground truth) to one process before ``evaluate``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from effdet_jax.data.box_rules import GroundTruthReport, sanitize_coco_dataset
from effdet_jax.data.label_map import LabelMap
from effdet_jax.detection.targets import CROWD

log = logging.getLogger(__name__)

# Names of COCOeval.stats, in order (automl's names).
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm", "ARl",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ClassAP:
    """COCO metrics of one category (-1 where it has no ground truth in that area range).

    ``num_gt``: its non-crowd ground-truth boxes on the evaluated images; ``ap`` is AP@[.5:.95].
    """

    category_id: int
    name: str
    num_gt: int
    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float


def _mean_valid(precision: np.ndarray) -> float:
    """Mean of the entries > -1 (COCOeval's convention for "no ground truth"), else -1."""
    valid = precision[precision > -1]
    return float(valid.mean()) if valid.size else -1.0


def per_class_ap(ev: COCOeval, gt: COCO, names: dict[int, str]) -> list[ClassAP]:
    """Per-category metrics of an accumulated ``COCOeval`` from its ``eval["precision"]``
    ([T iou thresholds, R recall thresholds, K categories, A area ranges, M max dets]) at the
    last ``maxDets`` (100), as ``COCOeval.summarize`` computes them for all categories at once."""
    precision = ev.eval["precision"]
    iou = ev.params.iouThrs
    t50, t75 = (int(np.argmin(np.abs(iou - v))) for v in (0.5, 0.75))
    areas = {label: i for i, label in enumerate(ev.params.areaRngLbl)}
    image_ids = set(ev.params.imgIds)
    num_gt: dict[int, int] = {}
    for ann in gt.dataset.get("annotations", []):
        if ann["image_id"] in image_ids and not ann.get("iscrowd", 0):
            num_gt[ann["category_id"]] = num_gt.get(ann["category_id"], 0) + 1
    rows = []
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, :, -1]  # [T, R, A]
        rows.append(ClassAP(
            category_id=int(cat), name=names.get(cat, str(cat)), num_gt=num_gt.get(cat, 0),
            ap=_mean_valid(p[:, :, areas["all"]]), ap50=_mean_valid(p[t50, :, areas["all"]]),
            ap75=_mean_valid(p[t75, :, areas["all"]]), aps=_mean_valid(p[:, :, areas["small"]]),
            apm=_mean_valid(p[:, :, areas["medium"]]), apl=_mean_valid(p[:, :, areas["large"]]),
        ))
    return rows


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[...,4] yxyx -> [...,4] COCO ``[x, y, width, height]``."""
    boxes = np.asarray(boxes, np.float64)
    y0, x0, y1, x1 = np.moveaxis(boxes, -1, 0)
    return np.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


class CocoEvaluator:
    """Accumulates detections (and optionally ground truth) and returns COCO metrics.

    Args:
      label_map: maps 0-based label indices to the dataset's category ids and names.
      gt_annotations: COCO json of the ground truth; None to build it from ``add_groundtruth``.
      per_class: also report ``AP/<class name>`` (AP@[.5:.95] per category) in the metrics
        (``class_rows`` is filled either way).
      image_sizes: ``{image_id: (height, width)}`` of the decoded files; where given they win
        over the json's ``height``/``width`` for clipping the ground truth.
    """

    def __init__(self, label_map: LabelMap, gt_annotations: str | None = None,
                 per_class: bool = False,
                 image_sizes: dict[int, tuple[int, int]] | None = None):
        self.label_map = label_map
        self.gt_annotations = gt_annotations
        self.image_sizes = image_sizes
        self.per_class = per_class
        # What the box rule did to the json's annotations; set by ``evaluate`` (None before, and
        # without a json).
        self.gt_report: GroundTruthReport | None = None
        # Per-category metrics of the last ``evaluate`` (empty before, or when it was skipped).
        self.class_rows: list[ClassAP] = []
        # Why the last ``evaluate`` returned no metrics (None when it scored).
        self.skipped: str | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything fed so far."""
        self._detections: list[dict] = []
        self._gt_images: dict[int, dict] = {}
        self._gt_annotations: list[dict] = []
        self._image_ids: set[int] = set()
        # Detections in a head slot that maps to no category of the label map (left out).
        self.num_without_category = 0

    def add_detections(
        self,
        image_id: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        classes: np.ndarray,
        valid: np.ndarray,
        image_hw: np.ndarray | None = None,
    ) -> None:
        """One batch of detections.

        Args:
          image_id: [B] int; rows with -1 (padding) are skipped.
          boxes: [B,K,4] yxyx in original-image pixels.
          scores: [B,K].
          classes: [B,K] 0-based label index.
          valid: [B] number of valid detections per row (the first ``valid[b]`` are used).
          image_hw: [B,2] original image height and width in pixels; boxes are clipped to the
            image (a box reaching into the eval padding ends at the image border). None: as given.
        """
        image_id = np.asarray(image_id).reshape(-1)
        boxes, scores, classes = np.asarray(boxes), np.asarray(scores), np.asarray(classes)
        for b, iid in enumerate(image_id):
            if iid < 0:
                continue
            self._image_ids.add(int(iid))
            n = int(np.asarray(valid).reshape(-1)[b])
            if n == 0:
                continue
            yxyx = np.asarray(boxes[b, :n], np.float64)
            if image_hw is not None:
                h, w = (float(v) for v in np.asarray(image_hw)[b])
                yxyx = np.clip(yxyx, 0.0, np.array([h, w, h, w]))
            xywh = yxyx_to_xywh(yxyx)
            cats = self.label_map.category_of_labels(classes[b, :n].astype(np.int64))
            # A 90-slot head also scores the 10 slots COCO leaves unused (ids 12, 26, ...):
            # those detections name no category, so no results file can hold them.
            known = np.isin(cats, self.label_map.category_ids)
            self.num_without_category += int(n - known.sum())
            for k in np.flatnonzero(known):
                self._detections.append({
                    "image_id": int(iid),
                    "category_id": int(cats[k]),
                    "bbox": [round(float(v), 3) for v in xywh[k]],
                    "score": round(float(scores[b, k]), 5),
                })

    def add_groundtruth(
        self,
        image_id: np.ndarray,
        boxes: np.ndarray,
        classes: np.ndarray,
        crowd_classes: np.ndarray | None = None,
        image_hw: np.ndarray | None = None,
    ) -> None:
        """One batch of ground truth (only used when there is no ``gt_annotations`` json).

        Args:
          image_id: [B] int; -1 rows are skipped.
          boxes: [B,M,4] yxyx in original-image pixels.
          classes: [B,M] label index; -1 padding; -2 crowd (its class is in ``crowd_classes``).
          crowd_classes: [B,M] label index of crowd rows (else -1), or None to ignore crowd rows.
          image_hw: [B,2] original image height and width (optional, only informative).
        """
        image_id = np.asarray(image_id).reshape(-1)
        boxes, classes = np.asarray(boxes), np.asarray(classes)
        for b, iid in enumerate(image_id):
            if iid < 0:
                continue
            iid = int(iid)
            self._image_ids.add(iid)
            info = {"id": iid}
            if image_hw is not None:
                info["height"], info["width"] = (int(v) for v in np.asarray(image_hw)[b])
            self._gt_images[iid] = info
            rows = [(int(c), 0) for c in classes[b]]
            if crowd_classes is not None:
                crowd = np.asarray(crowd_classes)[b]
                rows = [(int(crowd[m]), 1) if c == CROWD else (c, 0) for m, (c, _) in enumerate(rows)]
            for m, (label, is_crowd) in enumerate(rows):
                if label < 0:
                    continue
                x, y, w, h = (float(v) for v in yxyx_to_xywh(boxes[b, m]))
                self._gt_annotations.append({
                    "id": len(self._gt_annotations) + 1,
                    "image_id": iid,
                    "category_id": int(self.label_map.category_of_labels(np.array(label))),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": is_crowd,
                })

    def add_batch(self, batch: dict, detections: tuple) -> None:
        """Convenience: a pipeline eval batch plus ``(boxes, scores, classes, valid)`` in
        network-input pixels; both are mapped to original pixels with ``batch["image_scale"]``
        and clipped to the original image with ``batch["image_hw"]`` where the batch has it."""
        scale = np.asarray(batch["image_scale"], np.float64)[:, None, None]
        boxes, scores, classes, valid = (np.asarray(d) for d in detections)
        image_hw = batch.get("image_hw")
        self.add_detections(batch["image_id"], boxes * scale, scores, classes, valid, image_hw)
        if self.gt_annotations is None:
            self.add_groundtruth(batch["image_id"], np.asarray(batch["boxes"]) * scale,
                                 batch["classes"], batch.get("crowd_classes"), image_hw)

    @property
    def detections(self) -> list[dict]:
        """The COCO results list collected so far (xywh original pixels, dataset category ids)."""
        return self._detections

    @property
    def image_ids(self) -> list[int]:
        """The image ids fed so far (padding rows excluded), sorted."""
        return sorted(self._image_ids)

    def write_results(self, path: str) -> None:
        """Write the COCO results json of all detections (the submission format)."""
        with open(path, "w") as f:
            json.dump(self._detections, f)

    def _ground_truth(self) -> COCO:
        with contextlib.redirect_stdout(io.StringIO()):
            if self.gt_annotations is not None:
                with open(self.gt_annotations) as f:
                    raw = json.load(f)
                if "annotations" not in raw:
                    self.skipped = (f"{self.gt_annotations} has no 'annotations' list (an "
                                    "image-info json, e.g. test-dev): no ground truth")
                dataset, self.gt_report = sanitize_coco_dataset(
                    raw, set(self.label_map.category_lookup()), self.image_sizes)
                gt = COCO()
                gt.dataset = dataset
                gt.createIndex()
                return gt
            gt = COCO()
            gt.dataset = {
                "images": [self._gt_images.get(i, {"id": i}) for i in sorted(self._image_ids)],
                "annotations": copy.deepcopy(self._gt_annotations),
                "categories": self.label_map.categories_json(),
            }
            gt.createIndex()
        return gt

    def evaluate(self) -> dict[str, float]:
        """COCO metrics over the images fed so far (``METRIC_NAMES``, plus ``AP/<name>``).

        Returns ``{}`` (and sets ``skipped`` to the reason, logged as a warning) when there is no
        ground truth to score against: an image-info json, or not one box on the fed images.
        """
        if not self._image_ids:
            raise ValueError("no images were fed to the evaluator")
        self.skipped, self.class_rows = None, []
        gt = self._ground_truth()
        if self.gt_report is not None:
            log.log(logging.WARNING if self.gt_report.num_dropped or any(
                self.gt_report.counts.values()) else logging.INFO,
                "ground truth %s: %s", self.gt_annotations, self.gt_report.format())
        image_ids = sorted(self._image_ids)
        if self.skipped is None and not any(
                ann["image_id"] in self._image_ids for ann in gt.dataset["annotations"]):
            source = self.gt_annotations or "the eval split"
            self.skipped = f"{source} has no ground-truth box on the {len(image_ids)} images"
        if self.skipped is not None:
            log.warning("%s: metrics skipped (%d detections on %d images kept for the results "
                        "file)", self.skipped, len(self._detections), len(image_ids))
            return {}
        if not self._detections:
            log.warning("no detections: every metric is 0")
            return {k: 0.0 for k in METRIC_NAMES}
        missing = set(image_ids) - set(gt.getImgIds())
        if missing:
            raise ValueError(f"{len(missing)} of the {len(image_ids)} evaluated image ids are not "
                             f"in the ground truth {self.gt_annotations}: e.g. "
                             f"{sorted(missing)[:5]}; is it the json of the eval split "
                             "(config.data.eval_annotations / eval_split)?")
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(self._detections))
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            summary = io.StringIO()
            with contextlib.redirect_stdout(summary):
                ev.summarize()
        log.info("COCO metrics:\n%s", summary.getvalue())
        metrics = {k: float(v) for k, v in zip(METRIC_NAMES, ev.stats, strict=True)}
        names = dict(zip(self.label_map.category_ids, self.label_map.names, strict=True))
        self.class_rows = per_class_ap(ev, gt, names)
        if self.per_class:
            for row in self.class_rows:
                metrics[f"AP/{row.name}"] = row.ap
        return metrics
