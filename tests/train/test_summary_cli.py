"""``main.py --mode=summary`` as a user runs it: the published EfficientDet-D0 size and cost.

References: effdet's and automl's D0 parameter count (3,880,067, also in test_efficientdet's
table) and automl's D0 FLOPs (2.55 B, README of google/automl/efficientdet). The summary is built
from shapes alone (``jax.eval_shape``), so the full-size config runs in seconds.
"""

import os
import re
import subprocess
import sys

from train_helpers import ROOT


def test_summary_prints_d0_parameters_and_flops(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPROFILEIMPORTTIME="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config=configs/d0.py", f"--workdir={tmp_path}",
         "--mode=summary"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    total = re.search(r"^total\s+([\d,]+)\s+([\d,]+)\s*$", out, re.MULTILINE)
    assert total, out[-3000:]
    assert int(total.group(1).replace(",", "")) == 3_880_067
    automl_flops = re.search(r"^automl FLOPs\s+([\d,]+)\s*$", out, re.MULTILINE)
    assert automl_flops, out[-3000:]
    assert abs(int(automl_flops.group(1).replace(",", "")) / 2.551e9 - 1) < 1e-3
    # The per-level output shapes a user reads: 90 classes x 9 anchors and 4 x 9 box channels.
    assert "(64, 64, 810)/36" in out and "(4, 4, 810)/36" in out
    imported = re.findall(r"^import time:.*\|\s*(\S+)$", run.stderr, re.MULTILINE)
    assert "jax" in imported and "flax" in imported, run.stderr[-3000:]
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
