"""Shared benchmark plumbing: timing, memory, machine facts, fresh subprocesses per case.

Every measured case runs in fresh subprocesses (``run_case``), each printing one JSON line; the
driver collects them. Inside a case, ``timed`` calls the function ``warmup`` times and for at
least a second (compilation and caches) then ``repeats`` times, and reports median / min / max
milliseconds and every time.
``steady_peak_rss`` then samples the resident set size over a few more calls (the steady-state
peak; the sampling thread is kept out of the timed calls, whose two cores it would share);
``max_rss_mb`` is the whole process peak (for JAX it includes compilation). ``pool_processes``
merges one case's runs in several processes: the speed of a small case can differ between fresh
processes of the same code (memory backing, see RESULTS.md), so one process is one sample.

Thread counts are pinned before any numeric library is imported (``pin_threads``), so both sides
use the same number of cores.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import huge_pages  # benchmarks/huge_pages.py, beside this file

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = pathlib.Path.home() / ".cache/effdet_jax/torch-venv/bin/python"
JAX_PYTHON = ROOT / ".venv/bin/python"


def _load_launcher():
    """``effdet_jax/train/launcher.py`` loaded by path: it is stdlib-only, and the torch side's
    environment has neither effdet_jax nor jax (importing the package would import jax)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launcher", ROOT / "effdet_jax/train/launcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launcher = _load_launcher()
RESULT_PREFIX = "RESULT "
# XLA:CPU and PyTorch both malloc their large per-step buffers afresh each step; glibc serves them
# with fresh mmaps that every step page-faults and zero-fills again (a D0 train step: more system
# than user time). ``cached`` (the default) preloads tcmalloc (or jemalloc), which reuses freed
# extents: what main.py does for itself (effdet_jax/train/launcher.py) and what PyTorch's CPU tuning
# guide recommends. ``hugetlb`` only backs the fresh regions with huge pages (the setting of the
# 2026-11-25 runs); ``default`` is plain glibc. Both sides always run under the same setting.
_ALLOCATOR = launcher.find_allocator()
MALLOC_ENV = {
    "cached": launcher.cpu_malloc_env({}, _ALLOCATOR),
    "hugetlb": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "default": {},
}


def pin_threads(threads: int) -> None:
    """Limit XLA / OpenMP / MKL to ``threads`` cores; call before importing jax/torch (torch
    also needs ``torch.set_num_threads``)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    # XLA:CPU sizes its thread pool from the CPUs this process may use; restrict the affinity
    # mask so it sees exactly ``threads`` of them (no-op when the machine has that many).
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])


def config_compiled_from_scratch(name: str, image_size: int, cpu_kernels: str):
    """``configs/<name>.py``'s config at ``image_size`` (pixels, square) with
    ``model.overrides.cpu_kernels``, in a process whose persistent compilation cache is off, so
    a compile benchmark measures XLA rather than a cache hit."""
    import importlib

    import jax

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # configs/
    jax.config.update("jax_enable_compilation_cache", False)
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.image_size = image_size
    config.model.overrides.cpu_kernels = cpu_kernels
    return config


def timed(fn: Callable[[], object], warmup: int, repeats: int, min_warmup_s: float = 1.0) -> dict:
    """Median / min / max wall milliseconds of ``fn()`` (``fn`` must block until done), and the
    ``times_ms`` themselves (for pooling runs of several processes).

    Warm-up is ``warmup`` calls and at least ``min_warmup_s`` seconds: a 10 ms case needs more
    than two calls to settle after ``after_first_call`` re-maps its heap (~5 slow calls seen).
    """
    start = time.perf_counter()
    calls = 0
    while calls < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        calls += 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "runs": len(times),
        "times_ms": [round(t, 3) for t in times],
    }


def after_first_call(case: dict) -> dict:
    """What both sides do once the first call has allocated the step's buffers: back the resident
    heap with huge pages (``huge_pages.py``) unless ``case["huge_pages"]`` is false.
    Returns the result fields that record it."""
    if not case.get("huge_pages", True):
        return {"huge_pages_mb": 0}
    return {"huge_pages_mb": round(huge_pages.back_with_huge_pages() / 2**20)}


def steady_peak_rss(fn: Callable[[], object], calls: int = 2) -> float:
    """Peak RSS (MiB) sampled while ``fn()`` runs ``calls`` more times, after ``timed``: every call
    reaches the step's peak, and sampling apart from the timed calls keeps the 5 ms sampler off
    the cores they use (it cost the small cases ~2 %)."""
    with PeakRss() as peak:
        for _ in range(calls):
            fn()
    return peak.peak_mb


def pool_processes(runs: list[dict]) -> dict:
    """One case measured in several fresh processes, merged into one result.

    ``runs``: ``run_case`` results of the same case (each with ``times_ms``). The result is the
    first run with median / min / max over all timed calls of all processes, ``images_per_s`` from
    that median, ``process_median_ms`` (one per process, in run order) and ``fastest_process_ms``
    (their minimum: a small case runs at one of two speeds depending on the process, RESULTS.md,
    so comparing cases by their fastest process compares the code, not the draw), the largest
    memory and load figures, and the median compile / first-call time. Any failed run makes the
    result that error.
    """
    errors = [r for r in runs if "error" in r]
    if errors:
        return errors[0]
    times = [t for r in runs for t in r["times_ms"]]
    median = statistics.median(times)
    pooled = {**runs[0], "median_ms": median, "min_ms": min(times), "max_ms": max(times),
              "runs": len(times), "times_ms": times, "processes": len(runs),
              "process_median_ms": [round(r["median_ms"], 2) for r in runs],
              "fastest_process_ms": round(min(r["median_ms"] for r in runs), 2)}
    if "images_per_s" in runs[0]:
        pooled["images_per_s"] = runs[0]["batch"] / (median / 1e3)
    for key in ("peak_rss_steady_mb", "max_rss_mb", "xla_temp_mb", "load_before", "load_after",
                "load_wait_end"):
        if key in runs[0]:
            pooled[key] = max(r[key] for r in runs)
    for key in ("compile_s", "first_call_s"):
        if key in runs[0]:
            pooled[key] = statistics.median(r[key] for r in runs)
    return pooled


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRss:
    """Context manager sampling RSS every 5 ms; ``.peak_mb`` is the largest value seen."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, rss_mb())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak_mb = rss_mb()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb())


def emit(result: dict) -> None:
    """Print a case's result as the one line the driver parses."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def wait_for_low_load(max_load: float, timeout_s: float, poll_s: float = 10.0) -> float:
    """Wait (up to ``timeout_s``) until the 1-minute load average is below ``max_load``.

    Returns the load seen when measuring starts. Other people's jobs share the two cores; a busy
    core slows either side 10-30x, so measuring on a loaded machine compares nothing.
    """
    deadline = time.time() + timeout_s
    load = os.getloadavg()[0]
    while load >= max_load and time.time() < deadline:
        print(f"# load {load:.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(poll_s)
        load = os.getloadavg()[0]
    return load


def run_case(python: pathlib.Path | str, script: pathlib.Path | str, case: dict,
             threads: int, env: dict | None = None, timeout_s: float = 1800) -> dict:
    """Run ``script --case JSON`` in a fresh process and return its RESULT dict.

    The result gets ``load_before`` / ``load_after`` (1-minute load average) so a disturbed
    measurement can be spotted. Failures come back as ``{"error": ...}``.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env["BENCH_THREADS"] = str(threads)
    load_before = os.getloadavg()[0]
    cmd = [str(python), str(script), "--case", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout_s,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout_s}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {**case, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    result["load_before"] = round(load_before, 2)
    result["load_after"] = round(os.getloadavg()[0], 2)
    return result


def machine_info(jax_python: pathlib.Path | str = JAX_PYTHON) -> dict:
    """CPU model, cores, kernel, date and library versions (both venvs; ``jax_python`` is the
    interpreter of the JAX side, the repository's ``.venv`` unless a script ran another)."""
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = pathlib.Path("/proc/cpuinfo").read_text()
        isa = [f for f in ("avx2", "fma", "avx512f") if f" {f}" in flags]
    except OSError:
        isa = []
    info = {
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
    }
    jax_versions = _versions(jax_python, ("jax", "jaxlib", "flax", "optax"))
    torch_versions = _versions(TORCH_PYTHON, ("torch", "timm", "effdet"))
    info["jax_side"] = jax_versions
    info["torch_side"] = torch_versions
    return info


def _versions(python: pathlib.Path, packages: Sequence[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys, platform;"
        f"print(json.dumps({{p: m.version(p) for p in {list(packages)!r}}} | "
        "{'python': platform.python_version()}))"
    )
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - versions are informative only
        return {"error": str(e)}


def fmt_ms(r: dict) -> str:
    """``median (min-max)`` milliseconds, or the error."""
    if "error" in r:
        return "error"
    return f"{r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f})"
