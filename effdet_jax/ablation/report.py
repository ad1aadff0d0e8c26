"""What a sweep writes to its results folder: ``results.json`` (every run, per-arm intervals,
paired differences from the baseline), ``table.md`` (the same as tables and one sentence per
comparison, plus the cost columns of ``cost.json`` when ``experiments/cost.py`` wrote one) and the
plots ``ap50.png`` / ``loss.png`` (mean over seeds with its 95 % t-band, per arm, against steps).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from effdet_jax.ablation import stats

# Per-run numbers summarised per arm and compared with the baseline, with their table names.
METRICS = {"ap": "AP", "ap50": "AP50", "auc_ap50": "AUC AP50"}
COST_FILE = "cost.json"


def summarize(runs: Mapping[str, Sequence[dict]], baseline: str) -> dict:
    """``{arm: {"seeds", "failed", "converged", "stats": {metric: Interval dict},
    "vs_baseline": {metric: Interval dict}}}``; failed runs (non-zero exit) are left out of every
    number and listed under ``failed``."""
    def by_seed(label: str, metric: str) -> dict[int, float]:
        return {r["seed"]: r[metric] for r in runs[label] if r.get("returncode") == 0}

    arms = {}
    for label, arm_runs in runs.items():
        ok = [r for r in arm_runs if r.get("returncode") == 0]
        entry = {
            "seeds": [r["seed"] for r in ok],
            "failed": [{"seed": r["seed"], "error": r.get("error", "")} for r in arm_runs
                       if r.get("returncode") != 0],
            "converged": [r["seed"] for r in ok if r.get("converged")],
            "undecided": [r["seed"] for r in ok if r.get("converged") is None],
            "eval_points": min((r.get("eval_points", 0) for r in ok), default=0),
            "stats": {m: stats.t_interval([r[m] for r in ok]).to_dict() for m in METRICS},
        }
        if label != baseline:
            entry["vs_baseline"] = {
                m: stats.paired_difference(by_seed(label, m), by_seed(baseline, m)).to_dict()
                for m in METRICS}
        arms[label] = entry
    return arms


def _interval(d: dict) -> stats.Interval:
    return stats.Interval(d["mean"], d["low"], d["high"], d["n"])


def comparison_sentence(label: str, baseline: str, diffs: Mapping[str, dict]) -> str:
    """One sentence: each metric's paired difference and whether its interval excludes 0."""
    n = max(d["n"] for d in diffs.values())
    if n < 2:
        return (f"**{label} vs {baseline}**: {n} paired seed(s), too few for an interval; "
                "nothing is resolved.")
    parts = []
    for metric, name in METRICS.items():
        interval = _interval(diffs[metric])
        verdict = ((f"resolved, {label} {'higher' if interval.mean > 0 else 'lower'}")
                   if interval.resolved else "not resolved (the interval contains 0)")
        parts.append(f"{name} {interval.format(signed=True)}: {verdict}")
    return f"**{label} − {baseline}** over {n} paired seeds: " + "; ".join(parts) + "."


def cost_rows(cost: dict | None, labels: Sequence[str]) -> list[str]:
    """The cost table (parameters, MACs, inference and train-step ms) from ``cost.json``."""
    if not cost:
        return ["Cost not measured yet: `experiments/cost.py` with the same `--sweep` / `--base` "
                f"arguments writes `{COST_FILE}` here, and the next `ablate.py` run reads it."]
    machine = cost.get("machine", {})
    lines = [f"Measured alone by `experiments/cost.py` ({machine.get('date', '?')}, "
             f"{machine.get('cpu', '?')}, {cost.get('threads', '?')} threads; "
             "ms as the fastest process's median, then [median (min-max) over every timed call of "
             "every process]: a small case runs at one of two speeds depending on the process "
             "(benchmarks/RESULTS.md), so the fastest process compares the arms; "
             f"{cost.get('processes', '?')} processes per arm and mode; "
             "load = 1-min load average before the case):",
             "",
             "| arm | params | MACs | inference ms (batch "
             f"{cost.get('infer_batch', '?')}) | train step ms (batch {cost.get('train_batch', '?')}) "
             "| train img/s | load |",
             "|---|---|---|---|---|---|---|"]
    for label in labels:
        c = cost.get("arms", {}).get(label)
        if c is None:
            lines.append(f"| {label} | not in {COST_FILE} | | | | | |")
            continue
        infer, train = c.get("infer", {}), c.get("train", {})
        loads = "/".join(f"{r.get('load_before', math.nan):.1f}" for r in (infer, train) if r)
        ips = f"{train['images_per_s']:.1f}" if "images_per_s" in train else "-"
        lines.append(f"| {label} | {c['params']:,} | {c['macs']:,} | {_ms(infer)} | {_ms(train)} "
                     f"| {ips} | {loads} |")
    return lines


def _ms(r: dict) -> str:
    if not r:
        return "-"
    if "error" in r:
        return "error"
    pooled = f"{r['median_ms']:.1f} ({r['min_ms']:.1f}-{r['max_ms']:.1f})"
    if "fastest_process_ms" not in r:
        return pooled
    return f"{r['fastest_process_ms']:.1f} [{pooled}]"


def table(summary: dict, baseline: str, cost: dict | None, title: str) -> str:
    """``table.md``: accuracy with intervals, paired differences, sentences, cost."""
    rule = (f"last {stats.CONVERGED_POINTS} AP50 evaluations within {stats.CONVERGED_TOLERANCE} "
            "of each other")
    lines = [f"# {title}", "",
             f"Mean over seeds [{stats.CONFIDENCE:.0%} t-interval] of the final evaluation; AUC AP50 is "
             "the area under the AP50 curve divided by the steps it spans (its mean height). "
             f"Converged: {rule}.", "",
             "| arm | seeds | AP | AP50 | AUC AP50 | converged | eval points |",
             "|---|---|---|---|---|---|---|"]
    for label, s in summary.items():
        failed = f" ({len(s['failed'])} failed)" if s["failed"] else ""
        decided = len(s["seeds"]) - len(s["undecided"])
        conv = (f"{len(s['converged'])}/{decided}" if decided else "n/a") + (
            f" ({len(s['undecided'])} with < {stats.CONVERGED_POINTS} evaluations)" if s["undecided"] else "")
        st = {m: _interval(s["stats"][m]).format() for m in METRICS}
        lines.append(f"| {label} | {len(s['seeds'])}{failed} | {st['ap']} | {st['ap50']} "
                     f"| {st['auc_ap50']} | {conv} "
                     f"| {s['eval_points']} |")
    lines += ["", f"Difference from the baseline `{baseline}`, paired by seed "
              f"[{stats.CONFIDENCE:.0%} t-interval]:", "",
              "| arm | Δ AP | Δ AP50 | Δ AUC AP50 | paired seeds |", "|---|---|---|---|---|"]
    sentences = []
    for label, s in summary.items():
        if label == baseline:
            continue
        d = s["vs_baseline"]
        lines.append(f"| {label} | " + " | ".join(_interval(d[m]).format(signed=True) for m in METRICS)
                     + f" | {d['ap50']['n']} |")
        sentences.append("- " + comparison_sentence(label, baseline, d))
    lines += ["", *sentences]
    not_converged = [f"{label} (seeds {sorted(set(s['seeds']) - set(s['converged']) - set(s['undecided']))})"
                     for label, s in summary.items()
                     if len(s["converged"]) + len(s["undecided"]) < len(s["seeds"])]
    lines += ["", "Not converged by that rule: " + (", ".join(not_converged) or "none") + "."]
    failures = [f"- {label} seed {f['seed']}: {f['error']}" for label, s in summary.items()
                for f in s["failed"]]
    if failures:
        lines += ["", "Failed runs (rerun the same command to resume them):", *failures]
    lines += ["", "## Cost per arm", "", *cost_rows(cost, list(summary))]
    return "\n".join(lines) + "\n"


def band(curves: Sequence[Sequence[tuple[int, float]]]) -> tuple[np.ndarray, ...]:
    """Steps every curve has, and per step the mean and its t-interval bounds over the curves."""
    maps = [dict(c) for c in curves if c]
    if not maps:
        return (np.zeros(0),) * 4
    steps = sorted(set.intersection(*(set(m) for m in maps)))
    intervals = [stats.t_interval([m[s] for m in maps]) for s in steps]
    return (np.asarray(steps), np.asarray([i.mean for i in intervals]),
            np.asarray([i.low for i in intervals]), np.asarray([i.high for i in intervals]))


def plot(runs: Mapping[str, Sequence[dict]], curve: str, ylabel: str, path: pathlib.Path,
         title: str, log_y: bool = False) -> None:
    """One line per arm (mean over its finished seeds) with its 95 % t-band, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, arm_runs in runs.items():
        steps, mean, low, high = band([r.get(f"curve_{curve}", []) for r in arm_runs
                                       if r.get("returncode") == 0])
        if steps.size == 0:
            continue
        n = sum(1 for r in arm_runs if r.get("returncode") == 0)
        (line,) = ax.plot(steps, mean, marker="o" if steps.size <= 30 else None, markersize=3,
                          label=f"{label} (n={n})")
        if np.isfinite(low).any():
            ax.fill_between(steps, low, high, alpha=0.15, color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: pathlib.Path, runs: Mapping[str, Sequence[dict]], baseline: str, meta: dict,
          title: str) -> str:
    """Writes ``results.json``, ``table.md``, ``ap50.png`` and ``loss.png`` to ``out``; returns
    the table."""
    summary = summarize(runs, baseline)
    cost_path = out / COST_FILE
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else None
    text = table(summary, baseline, cost, title)
    (out / "table.md").write_text(text)
    band_note = f"mean over seeds, {stats.CONFIDENCE:.0%} t-band"
    plot(runs, "ap50", "COCO AP50 (eval split)", out / "ap50.png", f"{title}\nAP50, {band_note}")
    plot(runs, "loss", "training loss", out / "loss.png", f"{title}\nloss, {band_note}", log_y=True)
    results = {**meta, "baseline": baseline, "confidence": stats.CONFIDENCE,
               "converged_rule": {"points": stats.CONVERGED_POINTS,
                                  "tolerance": stats.CONVERGED_TOLERANCE},
               "arms": summary,
               "runs": {label: [{k: v for k, v in r.items() if k != "config"} for r in arm_runs]
                        for label, arm_runs in runs.items()},
               "cost_file": COST_FILE if cost else None}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return text
