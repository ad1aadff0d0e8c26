"""Helpers of the ``config.init`` tests: checkpoints in automl's naming, COCO-json folders."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from effdet_jax.convert.automl import automl_name_table
from effdet_jax.models.layout import model_groups, to_unrolled


def automl_named(variables: dict, model) -> dict[str, np.ndarray]:
    """``{"params", "batch_stats"}`` of ``model`` as automl TF1-named arrays (the inverse of
    ``convert_automl_arrays``), as automl's ``weights.npz`` stores them. The name table speaks of
    the unrolled layout: stacked modules are unrolled first."""
    unrolled = to_unrolled(jax.device_get(dict(variables)), model_groups(model.config))
    flat = traverse_util.flatten_dict(unrolled)
    out = {}
    for path, (tf1, _, layout) in automl_name_table(model).items():
        if layout.startswith("stack:"):
            if path[:-1] in flat:
                out[tf1] = np.asarray(flat[path[:-1]][int(layout[6:])])
            continue
        if path not in flat:
            continue
        value = np.asarray(flat[path])
        out[tf1] = np.transpose(value, (0, 1, 3, 2)) if layout == "depthwise" else value
    return out


def zero_variables(model) -> dict:
    """Zeros shaped like ``model``'s variables (shapes only: nothing is compiled)."""
    size = model.config.image_size
    size = size if isinstance(size, int) else size[0]
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))


def write_coco_folder(root: pathlib.Path, images: list[np.ndarray], boxes: list[np.ndarray],
                      categories: list[dict], category_ids: list[np.ndarray] | None = None,
                      scores: list[np.ndarray] | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """PNG images and a COCO json (``bbox`` ``[x, y, w, h]`` pixels) from yxyx pixel ``boxes``
    per image; returns (json path, image folder)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    entries, annotations = [], []
    for i, image in enumerate(images):
        name = f"im{i}.png"
        Image.fromarray(image).save(image_dir / name)
        entries.append({"id": i + 1, "file_name": name, "height": image.shape[0],
                        "width": image.shape[1]})
        for j, (y0, x0, y1, x1) in enumerate(np.asarray(boxes[i], np.float64)):
            cid = int(category_ids[i][j]) if category_ids is not None else categories[0]["id"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cid,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
            })
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": categories}))
    return path, image_dir

