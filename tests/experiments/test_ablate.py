"""``experiments/ablate.py`` as a user runs it: a two-arm sweep over a config key on
``configs/tiny.py``, its outputs (table, plots, results with intervals and paired differences, each
arm's resolved config), reuse of finished runs, and the early errors for a bad key or value; and
``experiments/cost.py`` writing the cost table the sweep's ``table.md`` reads."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import scipy.stats

from effdet_jax.ablation import runs as runs_lib
from effdet_jax.ablation import sweep
from effdet_jax.models.bifpn import FUSION_METHODS
from effdet_jax.models.efficientnet_config import DROP_CONNECT_VARIANTS

ROOT = pathlib.Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)
KEY = "config.model.fpn_weight_method"
# The sweep test's key: an input-pipeline one, so both arms train the same compiled programs and
# only the first run compiles (the others load them from the persistent cache); the runs and the
# sweep's bookkeeping are the same as for a model key.
SWEEP_KEY, ARMS = "config.data.hflip", ("true", "false")
# 3 steps with an evaluation after each: 3 points per curve, enough for the convergence rule.
SHORT = ["--set", "config.train.total_steps=3", "--set", "config.eval.every_steps=1",
         "--set", "config.log_every_steps=1"]


def _run(script: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           # One device: the runs test the sweep, not sharding (8 simulated devices cost threads).
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _flat(path: pathlib.Path) -> dict:
    return sweep.flatten(json.loads(path.read_text()))


def test_sweep_over_a_config_key(tmp_path):
    base, other = ARMS
    args = ["--sweep", f"{SWEEP_KEY}={base},{other}", "--seeds", "2", "--base", "configs/tiny.py",
            "--out", str(tmp_path), *SHORT]
    proc = _run("ablate.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    table = (tmp_path / "table.md").read_text()
    assert f"| {base} | 2 |" in table and f"| {other} | 2 |" in table
    assert f"**{other} − {base}** over 2 paired seeds: AP " in table
    assert "Cost not measured yet" in table
    for plot in ("ap50.png", "loss.png"):
        assert (tmp_path / plot).stat().st_size > 5000

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["baseline"] == base
    runs = results["runs"]
    assert [r["seed"] for r in runs[other]] == [0, 1]
    for arm_runs in runs.values():
        for r in arm_runs:
            assert [s for s, _ in r["curve_ap50"]] == [1, 2, 3]
            assert r["converged"] in (True, False) and [s for s, _ in r["curve_loss"]] == [1, 2, 3]
    # Intervals and the paired difference, recomputed from the per-run numbers with scipy.
    ap50 = {label: [r["ap50"] for r in rs] for label, rs in runs.items()}
    mean_ci = scipy.stats.ttest_1samp(ap50[base], 0).confidence_interval(0.95)
    assert results["arms"][base]["stats"]["ap50"]["low"] == pytest.approx(mean_ci.low)
    diff = results["arms"][other]["vs_baseline"]["ap50"]
    diff_ci = scipy.stats.ttest_rel(ap50[other], ap50[base]).confidence_interval(0.95)
    assert (diff["low"], diff["high"]) == pytest.approx((diff_ci.low, diff_ci.high))
    assert diff["n"] == 2 and diff["resolved"] == (diff_ci.low > 0 or diff_ci.high < 0)
    assert "vs_baseline" not in results["arms"][base]

    # The arms' resolved configs, and the configs the runs were made with, differ only in the key.
    key = SWEEP_KEY.removeprefix("config.")
    arm_configs = [_flat(tmp_path / "configs" / f"{a}.json") for a in ARMS]
    assert sweep.differing_keys(*arm_configs) == [key]
    assert arm_configs[1][key] is False and arm_configs[1]["train.total_steps"] == 3
    run_configs = [_flat(tmp_path / "runs" / f"{a}_seed0" / "config.json") for a in ARMS]
    assert sweep.differing_keys(*run_configs) == [key]
    # Every run after the first loads its train step from the persistent cache.
    for run_dir in ("true_seed1", "false_seed0", "false_seed1"):
        log = (tmp_path / "runs" / run_dir / "log.txt").read_text()
        assert "train step ready after" in log and "loaded from the persistent compilation cache" in log

    # A run's result.json records the command as typed in the repository (no local interpreter).
    result = json.loads((tmp_path / "runs" / "true_seed0" / "result.json").read_text())
    assert result["command"][:3] == ["python", "main.py", "--config=configs/tiny.py"]
    assert result["command"][3] == f"--workdir={tmp_path / 'runs' / 'true_seed0'}"

    # The same command again reuses every finished run (no training).
    again = _run("ablate.py", *args, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count('"reused": true') == 4
    # A finished run is not mixed with another config (here: another run length) in its folder.
    changed = {**run_configs[0], "train.total_steps": 4}
    arm = sweep.Arm(base, ((key, base),))
    with pytest.raises(sweep.SweepError, match=r"config.train.total_steps differ\): give a new --out"):
        runs_lib.run(arm, 0, "configs/tiny.py", (), changed, tmp_path)


def test_portable_command_and_committed_run_results():
    """Paths inside the repository become relative and this interpreter ``python``; of a run
    folder under experiments/results, git keeps result.json only (the sweep resumes from it on
    another machine) and ignores checkpoints and logs."""
    run_dir = "experiments/results/some_sweep/runs/sum_seed0"
    cmd = [sys.executable, str(ROOT / "main.py"), f"--config={ROOT / 'configs' / 'tiny.py'}",
           f"--workdir={ROOT / run_dir}", "--workdir=/elsewhere/run", "--config.train.seed=0"]
    assert runs_lib.portable_command(cmd) == [
        "python", "main.py", "--config=configs/tiny.py", f"--workdir={run_dir}",
        "--workdir=/elsewhere/run", "--config.train.seed=0"]
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [f"{run_dir}/result.json", f"{run_dir}/checkpoints/3/x", f"{run_dir}/log.txt"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.stdout.split() == files[1:], proc.stdout + proc.stderr


@pytest.mark.parametrize("sweep_args", [["--sweep=fusion"], ["--sweep=drop_connect", "--rates", "0.2"]])
def test_committed_runs_are_reused_by_the_current_configs(sweep_args):
    """Every committed run's recorded config equals the one this code resolves for its arm and
    seed (keys added to the config since then read as the value they had), so the sweep's command
    on a fresh clone reuses the run instead of stopping at "finished with another config"."""
    import argparse

    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    spec, configs, out = sweep.from_command_line(parser.parse_args(sweep_args), ablate.RESULTS)
    stored_runs = 0
    for arm in spec.arms:
        for seed in range(3):
            path = runs_lib.workdir_of(out, arm, seed) / runs_lib.RESULT_FILE
            if not path.exists():
                continue
            stored = sweep.with_keys_added_later(json.loads(path.read_text())["config"])
            assert sweep.differing_keys(stored, runs_lib.run_config(configs[arm.label], seed)) == [], path
            stored_runs += 1
    assert stored_runs >= 12
    # A key added later still counts when its value changed: fast_compile is not what they ran.
    fast = {**runs_lib.run_config(configs[spec.arms[0].label], 0), "xla_cpu_opt_preset": "fast_compile"}
    path = runs_lib.workdir_of(out, spec.arms[0], 0) / runs_lib.RESULT_FILE
    stored = sweep.with_keys_added_later(json.loads(path.read_text())["config"])
    assert sweep.differing_keys(stored, fast) == ["xla_cpu_opt_preset"]


@pytest.mark.parametrize("sweep_arg, message", [
    (f"{KEY[:-7]}=sum,attn", "unknown config key config.model.fpn_weight (no 'fpn_weight' in config.model); "
                             "did you mean config.model.fpn_weight_method"),
    (f"{KEY}=sum,bogus", "arm 'bogus' (--config.model.fpn_weight_method=bogus): config.model."
                         "fpn_weight_method='bogus' is invalid: allowed one of"),
    ("config.train.batch_size=8,eight", "invalid literal for int()"),
    ("config.model=1,2", "config.model is a section, not a value"),
    ("config.train.seed=1,2", "use --seeds N"),
    ("fusoin", "neither a preset (drop_connect, fusion) nor KEY=V1,V2"),
])
def test_bad_sweep_fails_before_any_run(tmp_path, capsys, sweep_arg, message):
    code = ablate.main(["--sweep", sweep_arg, "--base", "configs/tiny.py", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_presets_and_grid():
    base = sweep.resolve_config(str(ROOT / "configs" / "tiny.py"), [])
    fusion, baseline = sweep.parse_dimension("fusion", base, [0.2])
    assert [a.label for a in fusion] == list(FUSION_METHODS) and baseline == "attn"
    dc, baseline = sweep.parse_dimension("drop_connect", base, [0.1, 0.3])
    assert baseline == "none" and len(dc) == 1 + (len(DROP_CONNECT_VARIANTS) - 1) * 2
    assert dict(dc[[a.label for a in dc].index("channel@0.3")].overrides) == {
        "model.drop_connect_variant": "channel", "model.backbone_drop_connect_rate": "0.3"}
    lr, _ = sweep.parse_dimension("config.train.learning_rate=0.002,0.004", base, [])
    arms = sweep.grid([fusion[:2], lr])
    assert [a.label for a in arms] == [
        "fpn_weight_method=sum,learning_rate=0.002", "fpn_weight_method=sum,learning_rate=0.004",
        "fpn_weight_method=attn,learning_rate=0.002", "fpn_weight_method=attn,learning_rate=0.004"]
    spec = sweep.Sweep(tuple(arms), arms[0].label, str(ROOT / "configs" / "tiny.py"), ())
    configs = sweep.resolve_arms(spec)
    assert configs[arms[3].label].train.learning_rate == 0.004
    assert configs[arms[3].label].model.fpn_weight_method == "attn"


def test_cost_table_feeds_the_sweep_table(tmp_path):
    proc = _run("cost.py", "--sweep", f"{KEY}=sum,fastattn", "--base", "configs/tiny.py",
                "--out", str(tmp_path), "--modes", "infer", "--processes", "1", "--repeats", "3",
                "--warmup", "1", "--max-load", "1000")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cost = json.loads((tmp_path / "cost.json").read_text())
    from effdet_jax.summary import summarize
    from effdet_jax.train.experiment import build_model

    for label in ("sum", "fastattn"):
        config = sweep.resolve_config(str(ROOT / "configs" / "tiny.py"), [f"--{KEY}={label}"])
        expected = summarize(build_model(config.model))
        arm = cost["arms"][label]
        assert (arm["params"], arm["macs"]) == (expected.params, expected.macs)
        assert arm["infer"]["runs"] == 3 and arm["infer"]["median_ms"] > 0
        assert arm["infer"]["num_classes"] == 4 and arm["infer"]["image_size"] == 64
        assert "load_before" in arm["infer"]
    # fastattn has one weight per fusion input more than sum.
    assert cost["arms"]["fastattn"]["params"] > cost["arms"]["sum"]["params"]
    from effdet_jax.ablation import report

    rows = "\n".join(report.cost_rows(cost, ["sum", "fastattn"]))
    assert f"| fastattn | {cost['arms']['fastattn']['params']:,} |" in rows
    infer = cost["arms"]["fastattn"]["infer"]
    assert infer["fastest_process_ms"] == round(min(infer["process_median_ms"]), 2)
    assert f"| {infer['fastest_process_ms']:.1f} [{infer['median_ms']:.1f} (" in rows


def test_both_scripts_share_the_sweep_flags_and_results_folder(tmp_path):
    """``ablate.py`` and ``cost.py`` parse the same flags into the same arms and folder, so
    ``cost.json`` lands beside the sweep's ``table.md``."""
    import argparse

    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    flags = ["--sweep", f"{KEY}=sum,fastattn", "--base", "configs/tiny.py"]
    spec, configs, out = sweep.from_command_line(parser.parse_args(flags), tmp_path)
    assert out == tmp_path / "fpn_weight_method" and list(configs) == ["sum", "fastattn"]
    assert spec.baseline == "sum"
    _, _, out = sweep.from_command_line(parser.parse_args([*flags, "--out", "/x/y"]), tmp_path)
    assert out == pathlib.Path("/x/y")
    with pytest.raises(sweep.SweepError, match="neither a preset"):
        sweep.from_command_line(parser.parse_args(["--sweep", "fusoin"]), tmp_path)
