"""The train line's rate and ETA on a fake clock, and native stderr lines split by level (the
console as a whole is tested through ``main.py`` in ``test_console_cli.py``)."""

import logging
import os

from effdet_jax.train import console

METRICS = {"loss": 3.5, "cls_loss": 1.0, "box_loss": 0.04, "box_iou_loss": 0.0,
           "reg_l2_loss": 0.5, "learning_rate": 0.01}


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_leaves_out_compilation_and_evaluation():
    clock = FakeClock()
    progress = console.Progress(total_steps=1000, clock=clock)
    # Step 1 is fetched after a long compilation: the clock starts there.
    clock.now += 300.0
    progress.start_clock(1)
    clock.now += 10.0
    with progress.paused():  # an evaluation of 40 s inside the interval
        clock.now += 40.0
    clock.now += 10.0
    line = progress.line(101, METRICS)
    # 100 steps in 60 s - 40 s evaluated = 5 steps/s; 899 steps left = 179.8 s.
    assert line == ("step  101/1000  loss 3.5000 (cls 1 box 0.04 l2 0.5)  lr 1.000e-02  "
                    "5 steps/s  ETA 0:03:00")
    clock.now += 50.0  # the next interval starts at step 101, without the evaluation
    assert "  2 steps/s  ETA 0:06:40" in progress.line(201, METRICS)


def test_first_line_without_a_reference_and_iou_part():
    progress = console.Progress(total_steps=10, clock=FakeClock())
    line = progress.line(1, {**METRICS, "box_iou_loss": 0.25})
    assert line.endswith("(cls 1 box 0.04 iou 0.25 l2 0.5)  lr 1.000e-02  steps/s -  ETA -")


def test_eta_past_a_day():
    assert console.format_eta(2 * 86400 + 3723.4) == "2 days, 1:02:03"


def test_native_info_lines_go_to_the_log_and_the_rest_to_stderr(capfd, caplog):
    caplog.set_level(logging.INFO)
    with console.native_stderr_to_log():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n")
        os.write(2, b"I0000 00:00:1796537546.306304   30343 port.cc:153] oneDNN custom ops\n")
        os.write(2, b"E0000 00:00:1796537546.306304   30343 cuda.cc:1] no GPU\n")
    assert capfd.readouterr().err == "E0000 00:00:1796537546.306304   30343 cuda.cc:1] no GPU\n"
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "native: WARNING: All log messages before absl::InitializeLog() is called are written "
        "to STDERR",
        "native: I0000 00:00:1796537546.306304   30343 port.cc:153] oneDNN custom ops",
    ]
