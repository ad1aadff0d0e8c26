"""What a run prints, and where everything else goes.

``main.py`` calls ``setup(workdir)`` once its flags are parsed. From then on the console (stderr)
shows only

- the lines of ``say``: one per ``log_every_steps`` (``Progress.line``: step, loss and its
  parts, learning rate, steps/s, ETA), the evaluation's data line, and a few start-up facts;
- the evaluation block (``effdet_jax.evaluation.report``'s INFO records);
- warnings and errors, from any logger, in absl's format.

Every log record at absl's verbosity (INFO by default: orbax, jax, clu's parameter overview and
metric lines, the resolved config) goes to ``WORKDIR/log.txt`` in absl's format, console lines
included, appended across runs. ``--verbosity`` (absl's flag) given on the command line puts the
library records on the console as well: ``--verbosity=0`` INFO, ``--verbosity=1`` DEBUG.

Multi-process runs: ``trainer.setup`` calls ``set_process`` once ``jax.distributed`` is up. Only
process 0 prints ``say`` lines; process ``i > 0`` keeps warnings on its console and writes its
log to ``WORKDIR/log.process{i}.txt``. Records logged before ``set_process`` are held in memory
and written to the file it opens.

Without ``setup`` (the trainer called from a notebook or a test) nothing is redirected: ``say``
lines are ordinary INFO records.

Imports no TensorFlow: ``main.py`` sets this up first, then imports TensorFlow inside
``native_stderr_to_log``, so that its C++ start-up notices land in the log file.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging as absl_logging

LOGGER_NAME = "effdet_jax.console"
# Loggers whose INFO records are console lines: ``say``'s, and the evaluation block's
# (``effdet_jax.evaluation.report``, which does not depend on the trainer).
CONSOLE_LOGGERS = (LOGGER_NAME, "effdet_jax.evaluation.report")
LOG_FILE = "log.txt"
# ``WORKDIR/config.json`` belongs to resuming; this one is for people to read.
# Loss parts of the train line: (metric key, shown name); a part that is exactly 0 (the IoU loss
# when ``loss.iou_loss_type`` is unset) is left out.
LOSS_PARTS = (("cls_loss", "cls"), ("box_loss", "box"), ("box_iou_loss", "iou"),
              ("reg_l2_loss", "l2"))

# absl C++ INFO lines (``I0000 00:00:1796537546.306304   30343 port.cc:153] ...``) and absl's
# notice that logging is not initialised yet.
_NATIVE_INFO = re.compile(r"I\d{4} \d\d:\d\d:\d+\.\d+ +\d+ |WARNING: All log messages before absl::")

_logger = logging.getLogger(LOGGER_NAME)


def say(message: str, *args: object) -> None:
    """A console line (process 0), also written to the log file; ``%``-style like ``logging``."""
    _logger.info(message, *args)


def log_file_name(process_index: int) -> str:
    """``log.txt`` for process 0, ``log.process{i}.txt`` for the others."""
    return LOG_FILE if process_index == 0 else f"log.process{process_index}.txt"


class _NotConsole(logging.Filter):
    """Keeps console lines off absl's stderr handler: the console handler prints them bare."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name not in CONSOLE_LOGGERS


class _WorkdirFileHandler(logging.Handler):
    """Writes records in absl's format to a file in ``workdir``, chosen once the process index is
    known (``open``); records before that are kept, formatted, in memory."""

    def __init__(self, workdir: str):
        super().__init__()
        self.workdir = workdir
        self.path: str | None = None
        self._pending: list[str] = []
        self._stream = None
        self.setFormatter(absl_logging.PythonFormatter())

    def open(self, process_index: int) -> None:
        with self.lock:
            if self._stream is not None:
                return
            os.makedirs(self.workdir, exist_ok=True)
            self.path = os.path.join(self.workdir, log_file_name(process_index))
            self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._stream.writelines(line + "\n" for line in self._pending)
            self._stream.flush()
            self._pending = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 (logging's contract: report, never raise)
            self.handleError(record)
            return
        if self._stream is None:
            self._pending.append(line)
        else:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._stream is None and self._pending:
            self.open(0)  # the run ended before the process index was known: one process
        with self.lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        super().close()


class _State:
    file_handler: _WorkdirFileHandler | None = None
    console_handler: logging.Handler | None = None


def setup(workdir: str | None, library_info: bool = False) -> None:
    """Routes logging for a ``main.py`` run; call after absl parsed the flags.

    Args:
      workdir: the run's folder; ``None`` (``--mode=summary`` without one) keeps library records
        off the console without writing them anywhere.
      library_info: put library records at absl's verbosity on the console too (``main.py``
        passes whether ``--verbosity`` was given).
    """
    if _State.console_handler is not None:
        return  # once per process
    root = logging.getLogger()
    absl_handler = absl_logging.get_absl_handler()
    if absl_handler not in root.handlers:
        root.addHandler(absl_handler)
    absl_handler.addFilter(_NotConsole())
    if not library_info:
        absl_handler.setLevel(logging.WARNING)

    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    for name in CONSOLE_LOGGERS:
        logging.getLogger(name).addHandler(console)
        logging.getLogger(name).setLevel(logging.INFO)  # shown whatever absl's verbosity
    _State.console_handler = console

    if workdir:
        handler = _WorkdirFileHandler(workdir)
        root.addHandler(handler)
        _State.file_handler = handler
    absl_logging.info("command: %s", " ".join(sys.argv))


@contextlib.contextmanager
def native_stderr_to_log() -> Iterator[None]:
    """Sends the INFO lines that native code writes to stderr inside the block to the log file;
    its other lines go back to stderr when the block ends.

    For ``import tensorflow``: its C++ start-up notices (oneDNN) are absl C++ INFO lines, which
    ``TF_CPP_MIN_LOG_LEVEL`` no longer silences (TensorFlow 2.19 and later), preceded by absl's
    ``before absl::InitializeLog()`` notice.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if _NATIVE_INFO.match(line):
                    absl_logging.info("native: %s", line)
                else:
                    sys.stderr.write(line + "\n")


def set_process(process_index: int) -> None:
    """Opens this process's log file; only process 0 keeps ``say`` lines on its console.
    Does nothing without ``setup``."""
    if _State.file_handler is not None:
        _State.file_handler.open(process_index)
    if _State.console_handler is not None and process_index != 0:
        _State.console_handler.setLevel(logging.WARNING)


def log_path() -> str | None:
    """The log file of this process once ``set_process`` opened it, else None."""
    return None if _State.file_handler is None else _State.file_handler.path


def log_config(config: ml_collections.ConfigDict) -> None:
    """Writes ``config`` (an ``ml_collections.ConfigDict``), references resolved, as YAML into
    the log file (the workdir's ``config.json`` is ``run_config``'s)."""
    absl_logging.info("config:\n%s", config.copy_and_resolve_references())  # ml_collections' YAML


def start_line(config: ml_collections.ConfigDict, params: Any, start: int, total: int,
               config_path: str) -> str:
    """What a run is about to do: model, parameter count (``params``, a pytree of arrays), the
    steps, and where the config and the full log are."""
    count = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))
    line = (f"{config.model.name}: {count:,} parameters, steps {start + 1}..{total}; "
            f"config in {config_path}")
    return line + (f", full log in {log_path()}" if log_path() else "")


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` (``N days, H:MM:SS`` past a day)."""
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """The train line, with steps/s measured between reported steps.

    The clock starts at the first step whose metrics come back (``start_clock``), so compilation
    is not counted; time inside ``paused()`` (evaluation) is not counted either. A line with no
    earlier reference (the first step logged) shows ``-`` for steps/s and ETA.
    """

    def __init__(self, total_steps: int, clock=time.monotonic):
        self.total_steps = total_steps
        self._clock = clock
        self._mark: tuple[int, float] | None = None
        self._paused = 0.0

    def start_clock(self, step: int) -> None:
        """Marks ``step`` as done now, unless the clock already runs."""
        if self._mark is None:
            self._mark = (step, self._clock())
            self._paused = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the time inside (an evaluation) out of the current interval."""
        started = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - started

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        """The console line of ``step`` from its fetched metrics (``loss``, the ``LOSS_PARTS``,
        ``learning_rate``); restarts the interval at ``step``."""
        now = self._clock()
        rate = None
        if self._mark is not None and step > self._mark[0]:
            rate = (step - self._mark[0]) / max(now - self._mark[1] - self._paused, 1e-9)
        self._mark, self._paused = (step, now), 0.0
        width = len(str(self.total_steps))
        parts = " ".join(f"{name} {metrics[key]:.4g}" for key, name in LOSS_PARTS
                         if metrics.get(key, 0.0) != 0.0)
        speed = "steps/s -  ETA -" if rate is None else (
            f"{rate:.3g} steps/s  ETA {format_eta((self.total_steps - step) / rate)}")
        return (f"step {step:>{width}}/{self.total_steps}  loss {metrics['loss']:.4f} ({parts})  "
                f"lr {metrics['learning_rate']:.3e}  {speed}")
