"""Regenerates ``tests/reference/automl/`` from the full ``../shared/reference/automl``.

Usage: ``python tools/make_compact_automl_reference.py [--source DIR] [--dest DIR]``.

Deterministic: the same source gives byte-identical files (npz members carry a fixed timestamp).
The layout is described in ``tests/automl_compact.py`` and ``tests/reference/automl/README.md``.
Every encoding is checked against the source before it is written: weights round-trip bit for
bit, and the inputs regenerated from their seed equal the stored ones bit for bit.
"""

import argparse
import io
import pathlib
import shutil
import sys
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from automl_compact import (  # noqa: E402
    decode_weights,
    encode_weights,
    reconstruct_cls,
    sample_positions,
    take_positions,
)
from automl_inputs import reference_input  # noqa: E402

LEVELS = range(3, 8)
NUM_CLASSES = 90
WHOLE_FILES = ("hparams.json", "common/anchors.npz", "common/labels.npz", "common/losses.json",
               "d0/detections.npz", "lite0/anchors.npz")
WEIGHT_FILES = ("d0/weights.npz", "lite0/weights.npz", "d0_channel_attn/weights_delta.npz")
OUTPUT_FILES = ("d0/outputs.npz", "d0_channel_attn/outputs.npz", "lite0/outputs.npz")
INPUTS = {"common/input.npz": "d0", "lite0/input.npz": "lite0"}


def save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """Deflate-compressed npz with a fixed member timestamp (byte-reproducible); read back and
    checked against ``arrays`` (names, order, dtypes, shapes, bits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    stored = load(path)
    assert list(stored) == list(arrays), path
    for name, value in arrays.items():
        value = np.asarray(value)
        assert stored[name].dtype == value.dtype and stored[name].shape == value.shape, name
        assert stored[name].tobytes() == value.tobytes(), name


def load(path: pathlib.Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def compact_weights(source: pathlib.Path) -> dict[str, np.ndarray]:
    arrays = load(source)
    encoded = encode_weights(arrays)
    decoded = decode_weights(encoded)
    assert list(decoded) == list(arrays)
    for name, value in arrays.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape, name
        assert np.array_equal(decoded[name].view(np.uint32), value.view(np.uint32)), name
    return encoded


def compact_outputs(source: pathlib.Path, postprocess: bool) -> dict[str, np.ndarray]:
    """Sampled outputs; with ``postprocess`` every box output whole and per-anchor max logits."""
    outputs = load(source)
    compact: dict[str, np.ndarray] = {}
    for level in LEVELS:
        height, width = next(outputs[f"{n}_{level}"] for n in ("box", "cls")).shape[1:3]
        index = sample_positions(height, width)
        compact[f"index_{level}"] = index
        for name in ("cls", "box"):
            key = f"{name}_{level}"
            if key not in outputs:
                continue
            value = outputs[key]
            compact[f"scale_{key}"] = np.abs(value).max()
            whole = postprocess and name == "box"
            compact[key] = value if whole else take_positions(value, index)
        if postprocess:
            cls = outputs[f"cls_{level}"]
            per_anchor = cls.reshape(*cls.shape[:3], -1, NUM_CLASSES)
            cls_max = per_anchor.max(-1)
            cls_argmax = per_anchor.argmax(-1).astype(np.uint8)
            assert cls_max.min() > -50.0
            rebuilt = reconstruct_cls(cls_max, cls_argmax, NUM_CLASSES).reshape(per_anchor.shape)
            assert np.array_equal(rebuilt.argmax(-1), per_anchor.argmax(-1))
            assert np.array_equal(rebuilt.max(-1), cls_max)
            compact[f"cls_max_{level}"] = cls_max
            compact[f"cls_argmax_{level}"] = cls_argmax
    return compact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=pathlib.Path,
                        default=REPO.parent / "shared" / "reference" / "automl")
    parser.add_argument("--dest", type=pathlib.Path, default=REPO / "tests/reference/automl")
    args = parser.parse_args()
    source, dest = args.source, args.dest

    for name, model in INPUTS.items():
        stored = load(source / name)["image"]
        regenerated = reference_input(model)
        assert regenerated.dtype == stored.dtype and np.array_equal(regenerated, stored), name
    for name in WHOLE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    for name in WEIGHT_FILES:
        save_npz(dest / name, compact_weights(source / name))
    for name in OUTPUT_FILES:
        save_npz(dest / name, compact_outputs(source / name, postprocess=name.startswith("d0/")))
    for path in sorted(dest.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>10,d}  {path.relative_to(dest)}")


if __name__ == "__main__":
    main()
