"""What ``main.py`` prints: a train line per log interval, the evaluation block and warnings on the
console; orbax, absl, clu's parameter table, the hyperparameters and the config in
``WORKDIR/log.txt``; ``--verbosity=0`` puts the library INFO lines back on the console."""

import datetime
import json
import re
import subprocess

import pytest
from train_helpers import ROOT, main_command, subprocess_env

TOTAL, LOG_EVERY = 4, 2
# tiny.py: lr 0.08 * 8/64 = 0.01 after a warm-up from 0.008 over 0.25 epochs of 64/8 steps = 2
# steps; the line shows the rate the update of step s used, automl's linear warm-up at s - 1.
EXPECTED_LR = {2: 0.008 + (0.01 - 0.008) * 1 / 2, 4: 0.01}
BOX_LOSS_WEIGHT = 50.0  # default.py's loss.box_loss_weight; the IoU loss is off in tiny.py
NUMBER = r"[-+\d.e]+"
TRAIN_LINE = re.compile(
    rf"^step +(?P<step>\d+)/{TOTAL}  loss (?P<loss>{NUMBER}) "
    rf"\(cls (?P<cls>{NUMBER}) box (?P<box>{NUMBER}) l2 (?P<l2>{NUMBER})\)  lr (?P<lr>{NUMBER})  "
    rf"(?:(?P<rate>{NUMBER}) steps/s  ETA (?P<eta>\d+:\d\d:\d\d)|steps/s -  ETA -)$"
)
ABSL_INFO = re.compile(r"^I\d{4} ")


def _run(workdir, *flags: str, mode: str = "train_and_eval") -> str:
    cmd = main_command(workdir, f"--config.train.total_steps={TOTAL}",
                       f"--config.log_every_steps={LOG_EVERY}",
                       f"--config.eval.every_steps={TOTAL}",
                       f"--config.checkpoint.every_steps={TOTAL}", *flags)
    cmd[cmd.index("--mode=train")] = f"--mode={mode}"
    run = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=600)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-4000:]
    return console


def _seconds(hms: str) -> int:
    h, m, s = (int(x) for x in hms.split(":"))
    return int(datetime.timedelta(hours=h, minutes=m, seconds=s).total_seconds())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("console") / "run"
    return workdir, _run(workdir)


def test_console_shows_train_lines_and_the_eval_block_only(trained):
    workdir, console = trained
    lines = console.splitlines()
    assert not [li for li in lines if ABSL_INFO.match(li) or "orbax" in li], console[-4000:]
    assert not [li for li in lines if len(li) > 200], console
    train = [TRAIN_LINE.match(li) for li in lines if li.startswith("step ")]
    assert all(train), [li for li in lines if li.startswith("step ")]
    assert [int(m["step"]) for m in train] == [2, 4]
    for m in train:
        step = int(m["step"])
        assert float(m["lr"]) == pytest.approx(EXPECTED_LR[step], rel=1e-3)
        parts = float(m["cls"]) + BOX_LOSS_WEIGHT * float(m["box"]) + float(m["l2"])
        assert float(m["loss"]) == pytest.approx(parts, rel=2e-3, abs=2e-3)
        # The clock starts when step 1 is fetched, so both lines have a rate; ETA = steps left
        # at that rate.
        rate = float(m["rate"])
        assert rate > 0
        assert abs(_seconds(m["eta"]) - (TOTAL - step) / rate) <= 1
    # The evaluation block (effdet_jax.evaluation.report's), once, bare.
    assert sum(li.startswith(f"evaluation at step {TOTAL}: 16 images, ") for li in lines) == 1
    assert sum(li.startswith("  AP  ") for li in lines) == 1, console
    assert f"full log in {workdir}/log.txt" in console


def test_library_lines_config_and_tables_go_to_the_log_file(trained):
    workdir, console = trained
    log = (workdir / "log.txt").read_text()
    assert f"Saving checkpoint at step {TOTAL}" in log  # orbax
    assert "| Name " in log and "Total: " in log  # clu's parameter overview
    assert "[Hyperparameters] {" in log
    assert f"log_every_steps: {LOG_EVERY}" in log  # the resolved config
    # The console lines are in the log too, with absl's time stamps; the scalars once per step.
    console_lines = [li for li in console.splitlines() if TRAIN_LINE.match(li)]
    assert all(f"] {li}" in log for li in console_lines)
    for m in map(TRAIN_LINE.match, console_lines):
        scalars = next(li for li in log.splitlines() if f"] [{m['step']}] data/" in li)
        logged = float(re.search(rf"train/loss=({NUMBER})", scalars)[1])
        assert float(m["loss"]) == pytest.approx(logged, abs=1e-4)
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["total_steps"] == TOTAL and config["model"]["num_classes"] == 4


def test_verbosity_puts_library_info_on_the_console(trained):
    workdir, _ = trained
    console = _run(workdir, "--verbosity=0", mode="eval")
    lines = console.splitlines()
    assert any(ABSL_INFO.match(li) and "checkpoint_manager.py" in li for li in lines), console
    # The evaluation block is printed once, not also through absl's handler.
    assert sum(f"evaluation at step {TOTAL}: 16 images, " in li for li in lines) == 1, console
    assert sum(li.startswith("  AP  ") for li in lines) == 1, console
    # The log file keeps growing across runs.
    assert (workdir / "log.txt").read_text().count("] command: ") == 2
