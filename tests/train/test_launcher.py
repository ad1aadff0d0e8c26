"""The launcher's CPU malloc set-up: what the preloaded allocator does to a process (a freed large
block is reused, not page-faulted in again), how main.py's re-execution applies it, and that
``make demo`` gets it."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

from effdet_jax.train import launcher

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER_PATH = ROOT / "effdet_jax/train/launcher.py"

linux_glibc = pytest.mark.skipif(
    not launcher.should_reexec({"JAX_PLATFORMS": "cpu"}, None), reason="needs Linux with glibc"
)


def _plain_env(**extra: str) -> dict[str, str]:
    """This process's environment without a malloc set-up, JAX on the CPU, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _fake_allocator(folder: pathlib.Path) -> str:
    """An empty file named like tcmalloc: found by path; the loader skips it with a warning when
    it is preloaded, so a process started with it runs on as usual."""
    path = folder / launcher.ALLOCATORS[0]
    path.write_bytes(b"")
    return str(path)

# Allocates, touches and frees a 256 MiB block, then does it again, and reports the minor page
# faults of the second round: what every train step after the first pays.
FAULTS_SCRIPT = """
import json, resource
import numpy as np
def touch():
    a = np.ones(64 * 2**20, np.float32)
    del a
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _second_round_faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@linux_glibc
@pytest.mark.skipif(launcher.find_allocator() is None,
                    reason="no tcmalloc/jemalloc here (apt install libtcmalloc-minimal4)")
def test_preloaded_allocator_reuses_a_freed_large_block_without_page_faults():
    plain = _plain_env()
    default_faults = _second_round_faults(plain)
    cached = launcher.cpu_malloc_env(plain, launcher.find_allocator())
    cached_faults = _second_round_faults(cached)
    # 256 MiB of fresh pages: ~65k faults with 4 KiB pages, >= 128 with 2 MiB ones (numpy asks
    # for huge pages on large arrays).
    assert default_faults >= 128
    assert cached_faults <= 16, (default_faults, cached_faults)


def test_cpu_malloc_env_keeps_other_settings():
    env = launcher.cpu_malloc_env(
        {"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, "/x/libtcmalloc_minimal.so.4"
    )
    assert env["PATH"] == "/bin"
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4:libfoo.so"
    assert "MALLOC_CONF" not in env
    env = launcher.cpu_malloc_env({"MALLOC_CONF": "narenas:2"}, "libjemalloc.so.2")
    assert env["MALLOC_CONF"] == "narenas:2,oversize_threshold:0"
    env = launcher.cpu_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, None)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert "LD_PRELOAD" not in env
    assert launcher.is_set_up(env, None)
    assert not launcher.is_set_up({"LD_PRELOAD": "libfoo.so"}, None)


def test_the_huge_page_tunable_does_not_stand_in_for_an_installed_allocator():
    """``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` from a shell (or the old ``make demo``) is what
    the launcher sets up only where no allocator is installed; where one is, it still preloads it
    and keeps the tunable."""
    given = {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": launcher.HUGE_PAGES_TUNABLE}
    assert launcher.is_set_up(given, None)
    assert not launcher.is_set_up(given, "/x/libtcmalloc_minimal.so.4")
    child = launcher.cpu_malloc_env(given, "/x/libtcmalloc_minimal.so.4")
    assert child["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4"
    assert child["GLIBC_TUNABLES"] == launcher.HUGE_PAGES_TUNABLE
    assert launcher.is_set_up(child, "/x/libtcmalloc_minimal.so.4")
    # A caller's own preload of another allocator is respected.
    assert launcher.is_set_up({"LD_PRELOAD": "libjemalloc.so.2"}, "/x/libtcmalloc_minimal.so.4")


def test_find_allocator_looks_in_the_given_folders_first(tmp_path):
    fake = _fake_allocator(tmp_path)
    assert launcher.find_allocator([str(tmp_path)]) == fake


def test_status_line_names_the_allocator_or_how_to_get_one():
    line = launcher.status_line({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"})
    assert "libtcmalloc_minimal.so.4 preloaded" in line
    assert "install libtcmalloc-minimal4" in launcher.status_line({})


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), (" cpu ", True), ("cuda", False), ("cuda,cpu", False),
                            ("tpu", False)],
)
def test_jax_platforms_decides_whether_the_cpu_is_used(platforms, expected):
    assert launcher.jax_will_use_cpu({"JAX_PLATFORMS": platforms}) is expected


def test_no_reexec_when_opted_out_already_set_or_on_an_accelerator():
    for allocator in ("libtcmalloc_minimal.so.4", None):
        opted_out = {"JAX_PLATFORMS": "cpu", "EFFDET_JAX_CPU_MALLOC": "0"}
        assert not launcher.should_reexec(opted_out, allocator)
        env = launcher.cpu_malloc_env({"JAX_PLATFORMS": "cpu"}, allocator)
        assert not launcher.should_reexec(env, allocator)
        assert not launcher.should_reexec({"JAX_PLATFORMS": "cuda"}, allocator)


# Loads the launcher by path (as the benchmarks do), re-executes with the allocators of the folder
# in argv[1] (the launcher's own folders too when it is "-"), and prints the final environment.
REEXEC_SCRIPT = f"""
import importlib.util, json, os, sys
print("start", flush=True)
spec = importlib.util.spec_from_file_location("launcher", {str(LAUNCHER_PATH)!r})
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
folders = None if sys.argv[1] == "-" else [sys.argv[1]]
launcher.reexec_with_cpu_malloc(library_dirs=folders)
print(json.dumps(dict(os.environ)))
"""


def _run_reexec_script(env: dict[str, str], folder: str = "-") -> tuple[list[str], dict]:
    out = subprocess.run([sys.executable, "-c", REEXEC_SCRIPT, folder], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return out[:-1], json.loads(out[-1])


@linux_glibc
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_restarts_the_same_command_once_with_the_allocator(opt_out):
    env = _plain_env(**({"EFFDET_JAX_CPU_MALLOC": "0"} if opt_out else {}))
    starts, final_env = _run_reexec_script(env)
    # Re-executed: the script ran from its first line twice, and only the second run got past.
    assert starts == (["start"] if opt_out else ["start", "start"])
    allocator = launcher.find_allocator()
    assert launcher.is_set_up(final_env, allocator) is not opt_out
    if not opt_out:
        assert final_env == launcher.cpu_malloc_env(env, allocator)


def _demo_recipe(tmp_path: pathlib.Path) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the command of ``make demo``'s main.py line, from a dry
    run (``make -n``; the set-up lines it prints for a fresh venv are not run)."""
    out = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path}/venv"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    (line,) = [line for line in out.splitlines() if " main.py " in f" {line} "]
    words = shlex.split(line)
    assignments = {}
    while "=" in words[0] and not words[0].startswith(("/", "-")):
        key, value = words.pop(0).split("=", 1)
        assignments[key] = value
    return assignments, words


@linux_glibc
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("caller_tunables", [None, launcher.HUGE_PAGES_TUNABLE])
def test_make_demo_gets_the_allocator_where_it_is_installed(tmp_path, caller_tunables):
    """``make demo`` runs main.py, whose launcher, under the demo's environment, preloads an
    installed tcmalloc (a stand-in file here); glibc's huge-page tunable, from the Makefile or
    from the caller's shell, does not stop it."""
    assignments, command = _demo_recipe(tmp_path)
    assert command[0].endswith("/python") and command[1] == "main.py", command
    extra = {} if caller_tunables is None else {"GLIBC_TUNABLES": caller_tunables}
    env = {**_plain_env(**extra), **assignments}
    fake = _fake_allocator(tmp_path)

    starts, final_env = _run_reexec_script(env, str(tmp_path))
    assert starts == ["start", "start"]
    assert final_env["LD_PRELOAD"].split(":")[0] == fake
    assert final_env.get("GLIBC_TUNABLES") == env.get("GLIBC_TUNABLES")
    assert final_env == launcher.cpu_malloc_env(env, fake)

    # Without an allocator installed the demo gets glibc's huge pages instead.
    empty = tmp_path / "empty"
    empty.mkdir()
    if launcher.find_allocator([str(empty)]) is None:
        starts, final_env = _run_reexec_script(env, str(empty))
        assert launcher.HUGE_PAGES_TUNABLE in final_env["GLIBC_TUNABLES"].split(":")
        assert "LD_PRELOAD" not in final_env


def test_the_launcher_loads_by_path_without_jax_or_the_package():
    """main.py re-executes before anything heavy, and the benchmarks' PyTorch side loads the
    launcher by path in an environment without JAX or effdet_jax: it is stdlib-only."""
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('launcher', {str(LAUNCHER_PATH)!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "loaded = {m.split('.')[0] for m in sys.modules}; "
            "assert not loaded & {'jax', 'effdet_jax', 'numpy'}, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
