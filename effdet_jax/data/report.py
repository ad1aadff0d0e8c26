"""The data report: what a run's data holds, found before the first step.

For a COCO-json source (``config.data.source == "coco_json"``) each split's json is parsed and
every image file's header is opened (PIL ``Image.open`` without ``load``: size, format and colour
mode, no pixel decoding; a thread pool, since the cost is file-system latency) and the file is
classed as decoded by TF ops or by PIL (``image_io.tf_decodable``; the pipeline reads these
headers again from a cache). The box rule of
``box_rules.sanitize_coco_dataset`` runs on the annotations, with the decoded image sizes, so the
report counts exactly what training and evaluation fix or drop. Per split the report has:

* ``images``, ``boxes``: entries of the json's ``images`` and ``annotations`` lists;
* ``problems``: each non-zero ``PROBLEM_KEYS`` counter with up to 5 examples (file names for
  image counters and the instance cap, annotation ids for the other box counters): the damage
  a clean dataset does not have;
* ``notes``: each non-zero ``NOTE_KEYS`` counter: normal handling (colour conversion, crowd
  boxes left out of training, the ``max_instances_per_image`` cap), reported apart;
* ``largest_image``: the file with the most pixels, with its size;
* ``decoded_with_pil``: count and up to 5 examples of the readable files the pipeline decodes with
  PIL because TF ops cannot decode them to the same pixels (CMYK JPEG, 16-bit PNG, TIFF, a JPEG
  without its end marker...): slower, Python per example.

A file whose header opens but whose data is cut short is found only when the pipeline decodes
it; it is then counted as ``data/images_unreadable`` with the training metrics. ``tfds`` and
``shapes`` sources have nothing to scan (prepared records / generated in code); their report says
so and their counts come from the pipeline alone.

``config.data.on_bad_data``: ``"report"`` logs one table per split and writes
``WORKDIR/data_report.json``; ``"error"`` also raises ``BadDataError`` naming the first bad file
and the first bad annotation of the first split that has a problem (and the COCO-json source
then raises on a file that fails to decode, instead of replacing it).

Evaluation uses two more pieces from here: ``eval_image_sizes`` (the files' own sizes, which
clip the ground-truth json) and ``eval_scalars`` (its ``data/eval*`` TensorBoard scalars).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from PIL import Image

from effdet_jax.data.box_rules import (
    MAX_EXAMPLES,
    RULE_KEYS,
    GroundTruthReport,
    as_int,
    sanitize_coco_dataset,
)
from effdet_jax.data.image_io import is_converted, tf_decodable
from effdet_jax.data.label_map import from_categories

log = logging.getLogger(__name__)

ON_BAD_DATA: tuple[str, ...] = ("report", "error")
REPORT_FILE = "data_report.json"
# Damage: on_bad_data="error" stops on any of them. Names shared with ``counts.COUNT_KEYS`` mean
# the same thing there; ``images_missing``, ``images_size_mismatch`` and
# ``boxes_unknown_image_dropped`` are found by this scan only.
PROBLEM_KEYS: tuple[str, ...] = (
    "images_missing",  # listed in the json, no such file
    "images_unreadable",  # the header does not open: empty, not an image
    "images_size_mismatch",  # json width/height differ from the file's (the file's size is used)
    *RULE_KEYS,
    "boxes_unknown_image_dropped",  # annotation of an image id the json does not list
)
# Normal handling, reported apart.
NOTE_KEYS: tuple[str, ...] = (
    "images_converted",  # not RGB (grayscale, RGBA, palette, CMYK, 16-bit): converted on decoding
    "boxes_crowd_dropped",  # crowd boxes, left out of training examples (train split only)
    "boxes_over_max_dropped",  # beyond max_instances_per_image, smallest first (train split only)
)
# Counters whose examples are file names (the others' are annotation ids).
_FILE_KEYS = frozenset([*(k for k in PROBLEM_KEYS + NOTE_KEYS if k.startswith("images_")),
                        "boxes_over_max_dropped"])


class BadDataError(ValueError):
    """``on_bad_data="error"`` and the data has a problem; the message names the first bad file
    and annotation, and the fix."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a file's header says: ``height``/``width`` in pixels, the PIL ``format`` and
    ``mode`` and whether TF ops decode it (``image_io.tf_decodable``), or ``error``
    (``missing`` when there is no such file)."""

    height: int = 0
    width: int = 0
    mode: str = ""
    error: str | None = None
    missing: bool = False
    format: str = ""
    tf_decodable: bool = False


def read_header(path: str) -> Header:
    """Opens ``path``'s image header without decoding the pixels."""
    if not os.path.isfile(path):
        return Header(error="no such file", missing=True)
    try:
        with Image.open(path) as im:
            (width, height), mode, fmt = im.size, im.mode, str(im.format)
    except Exception as e:  # PIL raises many types for files that are not images
        return Header(error=f"{type(e).__name__}: {e}")
    return Header(height=height, width=width, mode=mode, format=fmt,
                  tf_decodable=tf_decodable(path, fmt, mode))


# read_header's results by (path, modification time, size): the report and the pipeline of a
# run read each header once.
_HEADER_CACHE: dict[tuple[str, int, int], Header] = {}


def _cached_header(path: str) -> Header:
    try:
        st = os.stat(path)
    except OSError:
        return read_header(path)
    key = (path, st.st_mtime_ns, st.st_size)
    header = _HEADER_CACHE.get(key)
    if header is None:
        header = _HEADER_CACHE[key] = read_header(path)
    return header


def read_headers(paths: Sequence[str]) -> list[Header]:
    """``read_header`` of each path, in order (threads: the cost is file-system latency); a
    file read before and unchanged since comes from a cache."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(_cached_header, paths))


@dataclasses.dataclass
class SplitReport:
    """The report of one split (see the module docstring); ``first_bad_file`` and
    ``first_bad_annotation`` describe the first entry, in json order, with a problem."""

    split: str
    annotations: str
    images_dir: str
    images: int = 0
    boxes: int = 0
    problems: dict[str, dict] = dataclasses.field(default_factory=dict)
    notes: dict[str, dict] = dataclasses.field(default_factory=dict)
    largest_image: dict | None = None
    decoded_with_pil: dict | None = None
    first_bad_file: str | None = None
    first_bad_annotation: str | None = None

    def add(self, key: str, count: int, examples: list) -> None:
        if count:
            table = self.problems if key in PROBLEM_KEYS else self.notes
            table[key] = {"count": int(count), "examples": list(examples)[:MAX_EXAMPLES]}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["split"]
        return out

    def table(self) -> str:
        """The report as a small text table (one row per non-zero counter)."""
        lines = [f"data report, {self.split} split ({self.annotations}): {self.images} images, "
                 f"{self.boxes} boxes"]
        for title, rows in (("problems (fixed or dropped)", self.problems),
                            ("normal handling", self.notes)):
            lines.append(f"  {title}:" + ("" if rows else " none"))
            for key, row in rows.items():
                kind = "files" if key in _FILE_KEYS else "annotation ids"
                lines.append(f"    {key:<30} {row['count']:>7}  e.g. {kind} {row['examples']}")
        if self.largest_image:
            li = self.largest_image
            lines.append(f"  largest image: {li['file_name']} ({li['height']}x{li['width']})")
        if self.decoded_with_pil:
            pil = self.decoded_with_pil
            lines.append(f"  decoded with PIL (not by TF ops): {pil['count']} files, e.g. "
                         f"{pil['examples']}")
        return "\n".join(lines)


def _load_json(path: str) -> dict:
    from effdet_jax.data.sources.coco_json import read_coco_json

    try:
        return read_coco_json(path)
    except ValueError as e:
        raise BadDataError(str(e)) from e


def _headers_of(data: Mapping[str, Any], image_dir: str) -> tuple[list[dict], list[Header]]:
    images = [im for im in data["images"] if isinstance(im, dict)]
    paths = [os.path.join(image_dir, str(im.get("file_name", ""))) for im in images]
    return images, read_headers(paths)


@functools.lru_cache(maxsize=4)
def decoded_sizes(annotations_path: str, image_dir: str) -> dict[int, tuple[int, int]]:
    """``{image_id: (height, width)}`` of the files' own sizes (the header's, which decoding
    keeps: EXIF orientation is ignored), for the images whose header opens. Cached: a run's
    evaluations read the same files."""
    images, headers = _headers_of(_load_json(annotations_path), image_dir)
    return {as_int(im.get("id")): (h.height, h.width)
            for im, h in zip(images, headers, strict=True) if h.error is None}


def eval_image_sizes(config: ml_collections.ConfigDict) -> dict[int, tuple[int, int]] | None:
    """``decoded_sizes`` of the eval split for a COCO-json source (``config`` is
    ``config.data``), else None: the sizes that clip the evaluation ground truth."""
    if config.source != "coco_json":
        return None
    return decoded_sizes(config.eval_annotations, config.eval_images)


def eval_scalars(gt_report: GroundTruthReport | None,
                 counts: Mapping[str, int]) -> dict[str, float]:
    """The data scalars of one evaluation: ``data/eval/<counter>`` (its pipeline's counts) and,
    with a ground-truth json, ``data/eval_gt/<rule>`` (what the box rule did to it) plus
    ``data/eval_gt/boxes_dropped`` (all annotations left out)."""
    scalars = {f"data/eval/{k}": float(v) for k, v in counts.items()}
    if gt_report is not None:
        scalars.update({f"data/eval_gt/{k}": float(v) for k, v in gt_report.counts.items()})
        scalars["data/eval_gt/boxes_unknown_image_dropped"] = float(gt_report.num_unknown_image)
        scalars["data/eval_gt/boxes_dropped"] = float(gt_report.num_dropped)
    return scalars


def _json_size(image: Mapping[str, Any]) -> tuple[int, int] | None:
    h, w = as_int(image.get("height")), as_int(image.get("width"))
    return (h, w) if h > 0 and w > 0 else None


def scan_coco_split(
    split: str,
    annotations_path: str,
    image_dir: str,
    label_space: str,
    max_instances: int,
    skip_crowd: bool,
) -> SplitReport:
    """The report of one COCO-json split (see the module docstring).

    ``max_instances`` and ``skip_crowd`` are the training rules (``config.data``); they apply to
    the ``"train"`` split only (evaluation ground truth is never capped, and keeps crowd boxes).
    """
    data = _load_json(annotations_path)
    known = set(from_categories(data["categories"], label_space).category_lookup())
    images, headers = _headers_of(data, image_dir)
    anns = data.get("annotations") or []
    report = SplitReport(split, annotations_path, image_dir, images=len(images), boxes=len(anns))

    found: dict[str, list[str]] = collections.defaultdict(list)
    sizes: dict[int, tuple[int, int]] = {}
    largest = None
    for im, h in zip(images, headers, strict=True):
        name = str(im.get("file_name", ""))
        if h.error is not None:
            key = "images_missing" if h.missing else "images_unreadable"
            found[key].append(name)
            report.first_bad_file = report.first_bad_file or f"{name} ({key}: {h.error})"
            continue
        sizes[as_int(im.get("id"))] = (h.height, h.width)
        if is_converted(h.mode):
            found["images_converted"].append(name)
        if not h.tf_decodable:
            found["decoded_with_pil"].append(f"{name} ({h.format} {h.mode})")
        json_size = _json_size(im)
        if json_size is not None and json_size != (h.height, h.width):
            found["images_size_mismatch"].append(name)
            report.first_bad_file = report.first_bad_file or (
                f"{name} (images_size_mismatch: json {json_size[0]}x{json_size[1]}, "
                f"file {h.height}x{h.width})")
        if largest is None or h.height * h.width > largest["height"] * largest["width"]:
            largest = {"file_name": name, "height": h.height, "width": h.width}
    report.largest_image = largest
    if found["decoded_with_pil"]:
        report.decoded_with_pil = {"count": len(found["decoded_with_pil"]),
                                   "examples": found["decoded_with_pil"][:MAX_EXAMPLES]}
    for key in ("images_missing", "images_unreadable", "images_size_mismatch", "images_converted"):
        report.add(key, len(found[key]), found[key])

    cleaned, gt = sanitize_coco_dataset(data, known, sizes)
    for key in RULE_KEYS:
        report.add(key, gt.counts[key], gt.examples[key])
    report.add("boxes_unknown_image_dropped", gt.num_unknown_image, gt.unknown_image_examples)
    if gt.first_flagged is not None:
        position, rule = gt.first_flagged
        ann = anns[position]
        report.first_bad_annotation = (
            f"annotation id {ann.get('id')!r} of image_id {ann.get('image_id')!r} "
            f"(bbox {ann.get('bbox', 'missing')!r}, category_id {ann.get('category_id')!r}): "
            f"{rule}")

    if split == "train":
        names = {as_int(im.get("id")): str(im.get("file_name", "")) for im in images}
        crowd = [a for a in cleaned["annotations"] if a.get("iscrowd")]
        if skip_crowd:
            report.add("boxes_crowd_dropped", len(crowd), [a.get("id") for a in crowd])
        per_image = collections.Counter(
            as_int(a.get("image_id")) for a in cleaned["annotations"]
            if not (skip_crowd and a.get("iscrowd")))
        over = {i: n - max_instances for i, n in per_image.items() if n > max_instances}
        report.add("boxes_over_max_dropped", sum(over.values()), [names[i] for i in over])
    return report


def _nothing_to_scan(source: str) -> str:
    if source == "shapes":
        return "synthetic shapes are generated in code: nothing to scan"
    return ("tfds examples are read from prepared records: nothing to scan before the first "
            "step; what the pipeline fixes or drops is logged as data/<counter>")


def report_data(
    config: ml_collections.ConfigDict, splits: Sequence[str], workdir: str | None
) -> dict[str, Any]:
    """Scans the data of ``splits``, logs one table per split and writes
    ``workdir/data_report.json`` (when ``workdir`` is given); returns the report.

    ``config`` is ``config.data``. Raises ``BadDataError`` when ``config.on_bad_data == "error"``
    and a split has a problem.
    """
    report: dict[str, Any] = {"source": config.source, "on_bad_data": config.on_bad_data,
                              "splits": {}}
    if config.source != "coco_json":
        report["note"] = _nothing_to_scan(config.source)
        log.info("data report: %s", report["note"])
    else:
        report["note"] = ("image headers are read, not decoded: a file cut short is counted "
                          "when the pipeline decodes it (data/images_unreadable)")
        for split in splits:
            r = scan_coco_split(split, config[f"{split}_annotations"], config[f"{split}_images"],
                                config.label_space, config.max_instances_per_image,
                                config.skip_crowd_during_training)
            log.log(logging.WARNING if r.problems else logging.INFO, "%s", r.table())
            if config.on_bad_data == "error" and r.problems:
                raise BadDataError(_error_message(r))
            report["splits"][split] = r.to_json()
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
    return report


def _error_message(r: SplitReport) -> str:
    counts = ", ".join(f"{k}={v['count']}" for k, v in r.problems.items())
    return (
        f"config.data.on_bad_data='error' and the {r.split} split ({r.annotations}) has bad "
        f"data: first bad file: {r.first_bad_file or 'none'}; first bad annotation: "
        f"{r.first_bad_annotation or 'none'}; all problems: {counts}. Fix the data, or run with "
        "--config.data.on_bad_data=report to have bad entries fixed or dropped and counted in "
        f"WORKDIR/{REPORT_FILE}."
    )
