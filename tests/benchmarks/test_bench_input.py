"""``benchmarks/bench_input.py`` as a user runs it, at toy sizes: it writes a JPEG folder and a
local tfds dataset, runs each case in a process pinned to the asked number of cores, and prints a
table row per case."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_bench_input_prints_one_row_per_case_on_pinned_cores(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_input.py"), "--cores=1",
           "--cases=coco_tf,tfds", "--num_images=8", "--source_size=96",
           "--image_size=64", "--batch_size=2", "--batches=2", f"--workdir={tmp_path}"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((tmp_path / "coco" / "images").glob("*.jpg"))) == 8
    assert list((tmp_path / "tfds" / "bench_coco_like").glob("1.0.0/*.tfrecord*"))
    cells = re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \(([0-9.]+)\) \|", run.stdout, re.M)
    rows = {name: (float(wall), float(per_cpu)) for name, wall, per_cpu in cells}
    assert set(rows) == {"COCO-json JPEG folder, TF decode", "tfds (TFRecords of JPEGs)"}
    assert all(wall > 0 and per_cpu > 0 for wall, per_cpu in rows.values()), rows
    assert "| case | 1 core: img/s (img/CPU-s) | load avg |" in run.stdout


def test_bench_input_refuses_unknown_cases_and_too_many_cores(tmp_path):
    base = [sys.executable, str(ROOT / "benchmarks" / "bench_input.py"), f"--workdir={tmp_path}"]
    run = subprocess.run([*base, "--cases=coco_gpu"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown ['coco_gpu']" in run.stderr
    run = subprocess.run([*base, "--cores=1,4096"], capture_output=True, text=True)
    assert run.returncode == 2 and "this process may use" in run.stderr
