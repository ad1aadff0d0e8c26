"""What one evaluation leaves for a person: a readable AP block, a per-class AP table, and files.

``finish_evaluation`` scores a filled ``CocoEvaluator`` and, on the writing process, writes

* ``<results_dir>/detections_<split>_step<N>.json``: every detection in the COCO submission
  format ``[{"image_id", "category_id", "bbox": [x, y, width, height], "score"}]``,
  original-image pixels and the dataset's category ids (what ``loadRes`` and the COCO evaluation
  server read);
* ``<results_dir>/metrics_<split>_step<N>.json``: the metrics and the per-class rows (empty when
  there was no ground truth, with the reason);

``<split>`` (``split_tag``) names the evaluated data, so evaluating test-dev and val2017 at the
same step keeps both files;

then logs one block: the summary metrics and the per-class table (AP, AP50, AP75, APs, APm, APl
and the number of ground-truth boxes of each category).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import ml_collections

from effdet_jax.evaluation.coco_metrics import ClassAP, CocoEvaluator

log = logging.getLogger(__name__)

# (label, metric key) per line of the summary block, in COCOeval.summarize's order.
_SUMMARY_LINES: tuple[tuple[tuple[str, str], ...], ...] = (
    (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75")),
    (("APs", "APs"), ("APm", "APm"), ("APl", "APl")),
    (("AR1", "ARmax1"), ("AR10", "ARmax10"), ("AR100", "ARmax100")),
    (("ARs", "ARs"), ("ARm", "ARm"), ("ARl", "ARl")),
)
_CLASS_COLUMNS: tuple[str, ...] = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def split_tag(data_config: ml_collections.ConfigDict) -> str:
    """A file-name word for the evaluated data of ``config.data``: tfds' ``eval_split`` (with
    ``test-dev`` where an image-info json restricts it), a COCO-json folder's annotation file
    name, or the source name."""
    if data_config.source == "tfds":
        tag = data_config.eval_split
        if data_config.eval_image_info:
            tag += "-" + os.path.basename(data_config.eval_image_info).removesuffix(".json")
    elif data_config.source == "coco_json":
        tag = os.path.basename(data_config.eval_annotations).removesuffix(".json")
    else:
        tag = data_config.source
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)


def results_path(results_dir: str, tag: str, step: int) -> str:
    """Where the COCO results json of the evaluation of ``tag`` at ``step`` goes."""
    return os.path.join(results_dir, f"detections_{tag}_step{step}.json")


def _value(v: float) -> str:
    return "   -  " if v < 0 else f"{v:6.3f}"  # -1: no ground truth in that range


def format_summary(metrics: dict[str, float]) -> str:
    """The 12 COCO numbers as four aligned lines (``-`` where COCOeval gives -1)."""
    return "\n".join(
        "  " + "   ".join(f"{label:<5} {_value(metrics[key])}" for label, key in line)
        for line in _SUMMARY_LINES
    )


def format_class_table(rows: list[ClassAP]) -> str:
    """One line per category, in category-id order: id, name, ground-truth boxes, AP columns."""
    width = max([len(r.name) for r in rows] + [5])
    head = (f"  {'id':>4}  {'class':<{width}}  {'gt':>6}  "
            + "  ".join(f"{c.upper() if c == 'ap' else 'AP' + c[2:]:>6}" for c in _CLASS_COLUMNS))
    lines = [head]
    for r in rows:
        values = "  ".join(_value(getattr(r, c)) for c in _CLASS_COLUMNS)
        lines.append(f"  {r.category_id:>4}  {r.name:<{width}}  {r.num_gt:>6}  {values}")
    return "\n".join(lines)


def format_report(step: int, evaluator: CocoEvaluator, metrics: dict[str, float]) -> str:
    """The evaluation block a person reads: source, summary, per-class table (or why skipped)."""
    source = evaluator.gt_annotations or "ground truth built from the eval batches"
    head = (f"evaluation at step {step}: {len(evaluator.image_ids)} images, "
            f"{len(evaluator.detections)} detections, ground truth: {source}")
    if evaluator.num_without_category:
        head += (f"\n  {evaluator.num_without_category} detections in head slots without a "
                 "category (e.g. COCO's unused ids in the 90-slot layout) left out")
    if not metrics:
        return f"{head}\n  no metrics: {evaluator.skipped}"
    parts = [head, format_summary(metrics)]
    if evaluator.class_rows:
        parts += ["  per-class AP (IoU .50:.95 unless named; '-': no ground truth):",
                  format_class_table(evaluator.class_rows)]
    return "\n".join(parts)


def finish_evaluation(evaluator: CocoEvaluator, step: int, results_dir: str | None,
                      tag: str = "eval", write_files: bool = True) -> dict[str, float]:
    """Scores ``evaluator`` (``{}`` without ground truth), writes the results and metrics json
    of ``tag`` (``split_tag``) to ``results_dir`` when ``write_files`` (the writing process) and
    ``results_dir`` is set, and logs the evaluation block. Returns the metrics."""
    metrics = evaluator.evaluate()
    if write_files and results_dir:
        os.makedirs(results_dir, exist_ok=True)
        path = results_path(results_dir, tag, step)
        evaluator.write_results(path)
        with open(os.path.join(results_dir, f"metrics_{tag}_step{step}.json"), "w") as f:
            json.dump({"step": step, "ground_truth": evaluator.gt_annotations,
                       "skipped": evaluator.skipped, "metrics": metrics,
                       "per_class": [dataclasses.asdict(r) for r in evaluator.class_rows]},
                      f, indent=1)
        log.info("evaluation at step %d: %d detections written to %s", step,
                 len(evaluator.detections), path)
    log.info("%s", format_report(step, evaluator, metrics))
    return metrics
