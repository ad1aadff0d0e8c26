"""Reading a checkpoint file or folder of any supported format into flat named numpy arrays.

What ``config.init`` accepts, told apart by the contents (not the file name):

- a TF checkpoint, as a folder with a ``checkpoint`` file or a prefix ``P`` with ``P.index``:
  automl TF1 (``efficientnet-b0/...`` names, optional ``/ExponentialMovingAverage`` copies) or a
  TF2 Keras ``save_weights`` checkpoint (object-graph keys), or an automl/TF ``efficientnet-bN``
  classifier checkpoint;
- a zip archive: ``.npz`` (numpy arrays) or a PyTorch ``.pth`` (``data.pkl`` inside; read with
  ``torch.load(weights_only=True)``, only where torch is installed);
- a ``.safetensors`` file (8-byte header length, then a JSON header);
- another run's workdir (a folder with ``checkpoints/``): ``WORKDIR`` (latest step),
  ``WORKDIR:best`` (the step with the best eval AP) or ``WORKDIR:<step>``.

``read(spec, use_ema)`` returns a ``CheckpointFile``: flat ``name -> array`` plus the naming
scheme (``NAMINGS``) it found. Every failure is a ``CheckpointFileError`` naming the file, what
was found and what was expected, raised before anything is converted.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import zipfile

import jax
import numpy as np

from effdet_jax.convert.automl import EMA_SUFFIX, read_automl_checkpoint, tf1_arrays

# Naming schemes of the arrays in a checkpoint.
#   automl_tf1: automl / TF EfficientNet names (``efficientnet-b0/blocks_0/...``, ``class_net/...``)
#   automl_tf2: TF2 Keras object-graph keys (``backbone/_blocks/0/...``) without the suffix
#   effdet: effdet (PyTorch) detector state dict (``backbone.conv_stem.weight``, ``class_net...``)
#   timm: timm EfficientNet classifier state dict (``conv_stem.weight``, ``classifier.weight``)
#   effdet_jax: this project's train state (``params/backbone/stem_conv/kernel``)
NAMINGS = ("automl_tf1", "automl_tf2", "effdet", "timm", "effdet_jax")

EXPECTED = (
    "expected an automl TF1/TF2 checkpoint (folder with a 'checkpoint' file, or a prefix with "
    "'.index'), an effdet or timm state dict (.safetensors, .npz, or .pth with torch installed), "
    "an automl-named .npz, or another run's workdir (WORKDIR, WORKDIR:best, WORKDIR:<step>)"
)
_WORKDIR_SELECTOR = re.compile(r"(?s)(.+):(best|latest|\d+)")
_SAFETENSORS_MAX_HEADER = 100 * 2**20


class CheckpointFileError(ValueError):
    """A checkpoint cannot be used; the message names the file and the cause."""


@dataclasses.dataclass(frozen=True)
class CheckpointFile:
    """Flat ``name -> float array`` of one checkpoint.

    ``naming``: one of ``NAMINGS``. ``ignored``: names with no model counterpart on purpose (step
    counters, optimizer slots). ``description``: what the file is, for logs and errors.
    ``path``: the file or folder (with the workdir step for a workdir).
    """

    path: str
    description: str
    naming: str
    arrays: dict[str, np.ndarray]
    ignored: frozenset[str] = frozenset()


def read(spec: str, use_ema: bool = True) -> CheckpointFile:
    """Reads the checkpoint ``spec`` names (see the module docstring); ``use_ema`` picks the EMA
    copies where the checkpoint has both (automl TF1, a workdir's train state)."""
    spec = os.path.expanduser(spec)
    match = _WORKDIR_SELECTOR.fullmatch(spec)
    if match and os.path.isdir(os.path.join(match[1], "checkpoints")):
        return _read_workdir(match[1], match[2], use_ema)
    path = spec
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "checkpoints")):
            return _read_workdir(path, "latest", use_ema)
        if os.path.isfile(os.path.join(path, "checkpoint")) or glob.glob(os.path.join(path, "*.index")):
            return _read_tf(path, use_ema)
        raise CheckpointFileError(
            f"{path}: a folder that is neither a run's workdir (no 'checkpoints' subfolder) nor a TF "
            f"checkpoint folder (no 'checkpoint' file, no *.index); {EXPECTED}"
        )
    if path.endswith(".index") and os.path.isfile(path):
        return _read_tf(path[: -len(".index")], use_ema)
    if os.path.isfile(path + ".index"):
        return _read_tf(path, use_ema)
    if not os.path.exists(path):
        raise CheckpointFileError(f"{path}: no such file or folder; {EXPECTED}")
    kind = _sniff(path)
    if kind == "npz":
        arrays = _guarded(path, "numpy .npz archive", lambda: _load_npz(path))
        return _named(path, "numpy .npz", arrays, use_ema)
    if kind == "safetensors":
        arrays = _guarded(path, "safetensors file", lambda: _load_safetensors(path))
        return _named(path, "safetensors", arrays, use_ema)
    return _named(path, "PyTorch file", _load_torch(path, use_ema), use_ema)


def _guarded(path: str, what: str, load):
    try:
        return load()
    except CheckpointFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear message
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointFileError(
            f"{path}: cannot read it as a {what} (damaged or truncated?): {type(e).__name__}: {cause}"
        ) from None


def _sniff(path: str) -> str:
    """``npz``, ``torch`` or ``safetensors`` from the first bytes (and a zip's member names)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointFileError(
                f"{path}: a zip archive (.npz / .pth) that cannot be opened (damaged or truncated?): {e}"
            ) from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointFileError(
            f"{path}: a zip archive that is neither a .npz nor a PyTorch file (members "
            f"{names[:5]}); {EXPECTED}"
        )
    if len(head) >= 9 and head[8:9] == b"{":
        if 0 < int.from_bytes(head[:8], "little") < _SAFETENSORS_MAX_HEADER:
            return "safetensors"
    raise CheckpointFileError(f"{path}: unknown format (first bytes {head[:8]!r}); {EXPECTED}")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def _load_torch(path: str, use_ema: bool) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointFileError(
            f"{path}: a PyTorch file, and torch is not installed here. Install torch, or save the "
            "state dict as .safetensors (safetensors.torch.save_file) or .npz where torch is"
        ) from None
    loaded = _guarded(path, "PyTorch file",
                      lambda: torch.load(path, map_location="cpu", weights_only=True))
    if isinstance(loaded, dict):
        for key in (("state_dict_ema", "state_dict") if use_ema else ("state_dict",)) + ("model",):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict):
        raise CheckpointFileError(f"{path}: a PyTorch file holding {type(loaded).__name__}, not a "
                                  "state dict")
    return {
        k: (v.float() if v.is_floating_point() else v).numpy()
        for k, v in loaded.items() if hasattr(v, "numpy")
    }


def _naming(names: set[str]) -> str | None:
    if any(n.startswith("params/") for n in names):
        return "effdet_jax"
    if any(n.startswith(("backbone/_", "class_net/conv_ops/")) for n in names):
        return "automl_tf2"
    if any(n.startswith("efficientnet-") or n.startswith("class_net/class-") for n in names):
        return "automl_tf1"
    if any(n.startswith(("backbone.conv_stem.", "class_net.predict.")) for n in names):
        return "effdet"
    if "conv_stem.weight" in names:
        return "timm"
    return None


def _named(path: str, container: str, arrays: dict[str, np.ndarray], use_ema: bool,
           ignored: frozenset[str] = frozenset()) -> CheckpointFile:
    naming = _naming(set(arrays))
    if naming is None:
        raise CheckpointFileError(
            f"{path}: a {container} whose {len(arrays)} names are neither automl, effdet nor timm "
            f"names (e.g. {sorted(arrays)[:4]}); {EXPECTED}"
        )
    if naming == "automl_tf1" and any(n.endswith(EMA_SUFFIX) for n in arrays):
        arrays, found = tf1_arrays(arrays, arrays.__getitem__, use_ema)
        ignored = ignored | found
        container += ", EMA copies" if use_ema else ", raw copies"
    if naming in ("effdet", "timm"):
        ignored = ignored | {n for n in arrays if n.endswith("num_batches_tracked")}
    described = {"automl_tf1": "automl-named", "automl_tf2": "automl TF2-named",
                 "effdet": "effdet state dict", "timm": "timm EfficientNet state dict"}[naming]
    return CheckpointFile(path, f"{described} {container}", naming, arrays, frozenset(ignored))


def _read_tf(path: str, use_ema: bool) -> CheckpointFile:
    arrays, style, ignored = _guarded(path, "TF checkpoint",
                                      lambda: read_automl_checkpoint(path, use_ema=use_ema))
    if style == "tf1":
        copies = "EMA copies" if use_ema and _has_ema(path) else "raw values"
        return _named(path, f"TF1 checkpoint ({copies})", arrays, use_ema, frozenset(ignored))
    return _named(path, "TF2 Keras checkpoint", arrays, use_ema, frozenset(ignored))


def _has_ema(path: str) -> bool:
    import tensorflow as tf

    if os.path.isdir(path):
        path = tf.train.latest_checkpoint(path)
    return any(n.endswith(EMA_SUFFIX) for n in tf.train.load_checkpoint(path).get_variable_to_shape_map())


def _read_workdir(workdir: str, selector: str, use_ema: bool) -> CheckpointFile:
    """The params and BN statistics (EMA copies if ``use_ema``) of one step of a run's workdir."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={"meta": ocp.JsonCheckpointHandler()},
    )
    try:
        step = _select_step(manager, workdir, directory, selector)
    finally:
        manager.close()
    path = os.path.join(directory, str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()

    def restore():
        tree = dict(checkpointer.metadata(path).item_metadata)
        names = ("ema_params", "ema_batch_stats") if use_ema else ("params", "batch_stats")
        item = {k: tree[k] for k in names}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return checkpointer.restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
        ), names

    restored, names = _guarded(path, f"orbax checkpoint of step {step}", restore)
    flat = traverse_util.flatten_dict(
        {"params": restored[names[0]], "batch_stats": restored[names[1]]}, sep="/"
    )
    copies = "EMA copies" if use_ema else "raw weights"
    return CheckpointFile(f"{workdir}:{step}", f"effdet_jax run, step {step} ({copies})",
                          "effdet_jax", {k: np.asarray(v) for k, v in flat.items()})


def _select_step(manager, workdir: str, directory: str, selector: str) -> int:
    """The step ``selector`` (``latest``, ``best`` or a number) names in ``manager``."""
    import orbax.checkpoint as ocp

    from effdet_jax.train.checkpointing import BEST_METRIC

    steps = list(manager.all_steps())
    if not steps:
        raise CheckpointFileError(f"{workdir}: a workdir without any checkpoint in {directory}")
    if selector == "latest":
        step = max(steps)
    elif selector == "best":
        scores = {}
        for s in steps:
            meta = _guarded(f"{directory}/{s}", "checkpoint record", lambda s=s: manager.restore(
                s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            if meta and BEST_METRIC in meta:
                scores[s] = float(meta[BEST_METRIC])
        if not scores:
            raise CheckpointFileError(
                f"{workdir}:best: none of the checkpoints (steps {steps}) records an eval "
                f"{BEST_METRIC}; use {workdir} (latest) or {workdir}:<step>"
            )
        step = max(scores, key=scores.get)
    else:
        step = int(selector)
        if step not in steps:
            raise CheckpointFileError(f"{workdir}:{step}: no such step; the workdir has {steps}")
    return step
