"""One (arm, seed) of a sweep: a ``main.py --mode=train_and_eval`` subprocess in its own workdir,
``OUT/runs/ARM_seedN/``, and its curves read back from the run's TensorBoard events.

Resuming is ``main.py``'s: a workdir with checkpoints continues from the last one. A finished run
(``result.json``) is reused; a run that exits non-zero is returned with its error and the end of
its console, so the sweep goes on and reports it, and the next invocation resumes it.

A finished run's ``result.json`` (its curves, resolved config and command, with paths relative to
the repository) is all the report needs. It is small and committed with the sweep's results
(``experiments/results/SWEEP/runs/*/result.json``; checkpoints and events stay ignored), so a
sweep also continues on another machine: the finished runs are reused, the rest run there.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Sequence

from effdet_jax.ablation import stats
from effdet_jax.ablation.sweep import (
    ROOT,
    Arm,
    SweepError,
    differing_keys,
    flatten,
    with_keys_added_later,
)

RESULT_FILE = "result.json"
# TensorBoard tags read back: eval metrics of the (EMA) weights, and the training loss.
CURVES = {"ap50": "eval/AP50", "ap": "eval/AP", "loss": "train/loss"}


def workdir_of(out: pathlib.Path, arm: Arm, seed: int) -> pathlib.Path:
    return out / "runs" / f"{arm.dirname}_seed{seed}"


def read_events(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the run's TensorBoard event files, one
    value per step (a step a resumed run wrote again keeps the later file's value)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up lines
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # summary_iterator's deprecation notice
    series: dict[str, dict[int, float]] = {}
    files = sorted(workdir.rglob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in "fiu":
                        continue
                    number = float(array.reshape(()))
                elif value.HasField("simple_value"):
                    number = float(value.simple_value)
                else:
                    continue
                series.setdefault(value.tag, {})[int(event.step)] = number
    return {tag: sorted(points.items()) for tag, points in series.items()}


def summarize_run(events: dict[str, list[tuple[int, float]]]) -> dict:
    """Curves, final AP / AP50, the AP50 curve's area (``stats.curve_area``) and convergence."""
    result: dict = {f"curve_{name}": events.get(tag, []) for name, tag in CURVES.items()}
    result["ap"] = result["curve_ap"][-1][1] if result["curve_ap"] else math.nan
    result["ap50"] = result["curve_ap50"][-1][1] if result["curve_ap50"] else math.nan
    result["auc_ap50"] = stats.curve_area(result["curve_ap50"])
    result["eval_points"] = len(result["curve_ap50"])
    result["converged"] = stats.converged(result["curve_ap50"])
    return result


def run(arm: Arm, seed: int, base: str, extra_flags: Sequence[str], config: dict,
        out: pathlib.Path) -> dict:
    """Train + evaluate ``arm`` at ``seed`` (or reuse its finished run); ``config`` is the run's
    resolved config as ``sweep.flatten`` gives it (a reused run must have been made with it)."""
    workdir = workdir_of(out, arm, seed)
    result_path = workdir / RESULT_FILE
    if result_path.exists():
        result = json.loads(result_path.read_text())
        changed = differing_keys(with_keys_added_later(result.get("config", {})), config)
        if changed:
            raise SweepError(
                f"{workdir} finished with another config ({', '.join('config.' + k for k in changed)} "
                "differ): give a new --out, or delete that run folder to run it again")
        result["reused"] = True
        return result
    resumed = (workdir / "checkpoints").is_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={base}", f"--workdir={workdir}",
           "--mode=train_and_eval", *extra_flags, *arm.flags(), f"--config.train.seed={seed}"]
    start = time.time()
    # main.py writes its full log to workdir/log.txt; console.txt is what it printed.
    with open(workdir / "console.txt", "a") as console:
        proc = subprocess.run(cmd, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT)
    result = {"arm": arm.label, "seed": seed, "returncode": proc.returncode,
              "wall_s": round(time.time() - start, 1), "resumed": resumed,
              "command": portable_command(cmd)}
    if proc.returncode != 0:
        tail = (workdir / "console.txt").read_text(errors="replace").strip().splitlines()[-3:]
        result["error"] = (f"exit {proc.returncode}: {' | '.join(tail)} (see {workdir}/console.txt; "
                           "the next run of the sweep resumes it from its last checkpoint)")
        return result
    result.update(summarize_run(read_events(workdir)))
    result["config"] = config
    result_path.write_text(json.dumps(result))
    return result


def portable_command(cmd: Sequence[str]) -> list[str]:
    """``cmd`` as a user on another machine types it: ``python`` for this interpreter and paths
    inside the repository relative to its root, so a committed ``result.json`` names no local
    path."""
    def portable(arg: str) -> str:
        if arg == sys.executable:
            return "python"
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        path = pathlib.Path(value)
        if path.is_absolute() and path.is_relative_to(ROOT):
            value = str(path.relative_to(ROOT))
        return f"{flag}{eq}{value}"
    return [portable(arg) for arg in cmd]


def run_config(config, seed: int) -> dict:
    """``flatten`` of an arm's config with the run's seed."""
    flat = flatten(config)
    flat["train.seed"] = seed
    return flat
