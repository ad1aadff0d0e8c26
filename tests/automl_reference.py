"""One loader for the google/automl reference data, whichever copy is present.

* The full folder ``../shared/reference/automl`` (63 MB, beside the clone, or under
  ``$EFFDET_JAX_SHARED``) is used when it exists.
* Otherwise the compact copy in ``tests/reference/automl`` (see its README): the same anchors,
  labels, detections, losses and weights, raw outputs at sampled positions, inputs regenerated
  from their seed. Tests that need what it leaves out (the 30 MB of raw logits, the TF
  checkpoints) skip and say so.
* ``EFFDET_JAX_REQUIRE_FULL_AUTOML=1`` (set by ``.ci/run``) makes the full folder required: a
  missing one fails instead of falling back.

Both copies give the same keys, shapes and dtypes, and tests use the same tolerances on both.
"""

import dataclasses
import json
import os
import pathlib

import numpy as np
import pytest
from automl_compact import decode_weights, reconstruct_cls, take_positions
from automl_inputs import reference_input

REQUIRE_FULL_ENV = "EFFDET_JAX_REQUIRE_FULL_AUTOML"
COMPACT_ROOT = pathlib.Path(__file__).resolve().parent / "reference" / "automl"
LEVELS = tuple(range(3, 8))
NUM_CLASSES = 90
WEIGHT_FILES = {"d0": "d0/weights.npz", "lite0": "lite0/weights.npz"}


def _load(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@dataclasses.dataclass(frozen=True)
class ReferenceOutputs:
    """Expected raw outputs ``cls_L`` / ``box_L`` of one model.

    ``arrays[key]`` is [B, H, W, C] when stored whole, or [B, n_L, C] at the flat positions
    ``index[L]`` (``y * W + x``) when sampled. ``scales[key]`` is max |value| over the whole
    output, so tolerances relative to it are the same for both copies.
    """

    arrays: dict[str, np.ndarray]
    scales: dict[str, float]
    index: dict[int, np.ndarray]

    @classmethod
    def whole(cls, arrays: dict[str, np.ndarray]) -> "ReferenceOutputs":
        """Every ``cls_L`` / ``box_L`` entry of ``arrays``, stored whole; other entries dropped."""
        kept = {k: v for k, v in arrays.items() if _is_output_key(k)}
        return cls(kept, {k: float(np.abs(v).max()) for k, v in kept.items()}, {})

    def keys(self) -> set[str]:
        return set(self.arrays)

    def select(self, key: str, output: np.ndarray) -> np.ndarray:
        """A model output [B, H, W, C] at the positions ``arrays[key]`` holds."""
        output = np.asarray(output)
        if self.arrays[key].ndim == 4:
            return output
        return take_positions(output, self.index[int(key.split("_")[1])])


def _is_output_key(key: str) -> bool:
    name, _, level = key.partition("_")
    return name in ("cls", "box") and level.isdigit()


@dataclasses.dataclass(frozen=True)
class AutomlReference:
    """The reference folder ``root``; ``full`` is False for the compact copy."""

    root: pathlib.Path
    full: bool

    def skip_unless_full(self, what: str) -> None:
        """Skips the calling test on the compact copy: ``what`` needs the full folder."""
        if not self.full:
            pytest.skip(f"needs {what}: the compact automl copy (tests/reference/automl) leaves it "
                        "out; it is in ../shared/reference/automl beside the clone")

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """A file kept whole in both copies: ``common/{anchors,labels}.npz``,
        ``lite0/anchors.npz``, ``d0/detections.npz``."""
        return _load(self.root / name)

    def json(self, name: str) -> dict:
        """``common/losses.json`` or ``hparams.json``."""
        return json.loads((self.root / name).read_text())

    def weights(self, model: str) -> dict[str, np.ndarray]:
        """``automl name -> float32 array`` for "d0", "lite0" or "d0_channel_attn" (d0's weights
        with the channel_attn delta applied)."""
        if model == "d0_channel_attn":
            arrays = self.weights("d0")
            arrays.update(self._weight_file("d0_channel_attn/weights_delta.npz"))
            return arrays
        return self._weight_file(WEIGHT_FILES[model])

    def _weight_file(self, name: str) -> dict[str, np.ndarray]:
        arrays = _load(self.root / name)
        return arrays if self.full else decode_weights(arrays)

    def input(self, model: str) -> np.ndarray:
        """[2, S, S, 3] float32 normalised input: "d0", "d0_channel_attn" (S=512), "lite0" (320)."""
        if not self.full:
            return reference_input(model)
        name = "lite0/input.npz" if model == "lite0" else "common/input.npz"
        return _load(self.root / name)["image"]

    def outputs(self, model: str) -> ReferenceOutputs:
        """Expected raw outputs of "d0", "d0_channel_attn" or "lite0", keys as in the full
        ``outputs.npz``: d0 has every level, the others every ``box_L`` and ``cls_6``, ``cls_7``."""
        arrays = _load(self.root / model / "outputs.npz")
        if self.full:
            return ReferenceOutputs.whole(arrays)
        kept = {k: v for k, v in arrays.items() if _is_output_key(k)}
        scales = {k[len("scale_"):]: float(v) for k, v in arrays.items() if k.startswith("scale_")}
        index = {int(k.split("_")[1]): v for k, v in arrays.items() if k.startswith("index_")}
        return ReferenceOutputs(kept, scales, index)

    def d0_postprocess_inputs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """d0's raw outputs as post-processing sees them: cls [2, H, W, 810] and box [2, H, W, 36]
        per level. The compact copy rebuilds cls from each anchor's max logit and class (every
        other class far below any threshold); box is whole in both copies."""
        arrays = _load(self.root / "d0/outputs.npz")
        box = [arrays[f"box_{lvl}"] for lvl in LEVELS]
        if self.full:
            return [arrays[f"cls_{lvl}"] for lvl in LEVELS], box
        cls = [reconstruct_cls(arrays[f"cls_max_{lvl}"], arrays[f"cls_argmax_{lvl}"], NUM_CLASSES)
               for lvl in LEVELS]
        return cls, box

    def d0_full_outputs(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """d0's every logit and box output per level; skips on the compact copy."""
        self.skip_unless_full("every raw d0 output (d0/outputs.npz, 30 MB)")
        arrays = _load(self.root / "d0/outputs.npz")
        return [arrays[f"cls_{lvl}"] for lvl in LEVELS], [arrays[f"box_{lvl}"] for lvl in LEVELS]

    def archive(self, name: str) -> pathlib.Path:
        """A TF checkpoint tarball (``d0/ckpt_*.tar.xz``); skips on the compact copy."""
        self.skip_unless_full(f"the TF checkpoint {name} (6 MB)")
        return self.root / name


def find_reference(shared_reference: pathlib.Path) -> AutomlReference:
    """The full folder under ``shared_reference`` when present, else the compact copy; fails when
    ``$EFFDET_JAX_REQUIRE_FULL_AUTOML`` is 1 and the full folder is missing."""
    full = shared_reference / "automl"
    if full.is_dir():
        return AutomlReference(full, True)
    if os.environ.get(REQUIRE_FULL_ENV) == "1":
        pytest.fail(f"automl reference data not found at {full} and {REQUIRE_FULL_ENV}=1: shared/ "
                    "must sit beside the clone, or set EFFDET_JAX_SHARED=/path/to/shared")
    if not COMPACT_ROOT.is_dir():
        pytest.fail(f"neither {full} nor the compact copy {COMPACT_ROOT} exists")
    return AutomlReference(COMPACT_ROOT, False)
