"""The CPU malloc set-up: what the preloaded allocator does to a process (a freed large block is
reused, not page-faulted in again) and how main.py's re-execution applies it."""

import json
import os
import subprocess
import sys

import pytest

from effdet_jax import cpu_malloc

linux_glibc = pytest.mark.skipif(
    not cpu_malloc.should_reexec({"JAX_PLATFORMS": "cpu"}), reason="needs Linux with glibc"
)

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
@pytest.mark.skipif(cpu_malloc.find_allocator() is None,
                    reason="no tcmalloc/jemalloc here (apt install libtcmalloc-minimal4)")
def test_preloaded_allocator_reuses_a_freed_large_block_without_page_faults():
    plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    default_faults = _second_round_faults(plain)
    cached = cpu_malloc.cpu_malloc_env(plain, cpu_malloc.find_allocator())
    cached_faults = _second_round_faults(cached)
    # 256 MiB of fresh pages: ~65k faults with 4 KiB pages, >= 128 with 2 MiB ones (numpy asks
    # for huge pages on large arrays).
    assert default_faults >= 128
    assert cached_faults <= 16, (default_faults, cached_faults)


def test_cpu_malloc_env_keeps_other_settings():
    env = cpu_malloc.cpu_malloc_env(
        {"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, "/x/libtcmalloc_minimal.so.4"
    )
    assert env["PATH"] == "/bin"
    assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4:libfoo.so"
    assert "MALLOC_CONF" not in env
    env = cpu_malloc.cpu_malloc_env({"MALLOC_CONF": "narenas:2"}, "libjemalloc.so.2")
    assert env["MALLOC_CONF"] == "narenas:2,oversize_threshold:0"
    env = cpu_malloc.cpu_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, None)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
    assert "LD_PRELOAD" not in env
    assert cpu_malloc.has_cpu_malloc(env)
    assert not cpu_malloc.has_cpu_malloc({"LD_PRELOAD": "libfoo.so"})


def test_status_line_names_the_allocator_or_how_to_get_one():
    line = cpu_malloc.status_line({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"})
    assert "libtcmalloc_minimal.so.4 preloaded" in line
    assert "install libtcmalloc-minimal4" in cpu_malloc.status_line({})


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), (" cpu ", True), ("cuda", False), ("cuda,cpu", False),
                            ("tpu", False)],
)
def test_jax_platforms_decides_whether_the_cpu_is_used(platforms, expected):
    assert cpu_malloc.jax_will_use_cpu({"JAX_PLATFORMS": platforms}) is expected


def test_no_reexec_when_opted_out_already_set_or_on_an_accelerator():
    assert not cpu_malloc.should_reexec({"JAX_PLATFORMS": "cpu", "EFFDET_JAX_CPU_MALLOC": "0"})
    for allocator in ("libtcmalloc_minimal.so.4", None):
        env = cpu_malloc.cpu_malloc_env({"JAX_PLATFORMS": "cpu"}, allocator)
        assert not cpu_malloc.should_reexec(env)
    assert not cpu_malloc.should_reexec({"JAX_PLATFORMS": "cuda"})


REEXEC_SCRIPT = """
import json, os
print("start", flush=True)
from effdet_jax import cpu_malloc
cpu_malloc.reexec_with_cpu_malloc()
print(json.dumps(dict(os.environ)))
"""


@linux_glibc
@pytest.mark.parametrize("opt_out", [False, True])
def test_reexec_restarts_the_same_command_once_with_the_allocator(opt_out):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env["JAX_PLATFORMS"] = "cpu"
    if opt_out:
        env["EFFDET_JAX_CPU_MALLOC"] = "0"
    out = subprocess.run([sys.executable, "-c", REEXEC_SCRIPT], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    # Re-executed: the script ran from its first line twice, and only the second run got past.
    assert out[:-1] == (["start"] if opt_out else ["start", "start"])
    final_env = json.loads(out[-1])
    assert cpu_malloc.has_cpu_malloc(final_env) is not opt_out
    if not opt_out:
        assert final_env == cpu_malloc.cpu_malloc_env(env, cpu_malloc.find_allocator())


def test_importing_cpu_malloc_loads_no_jax():
    """main.py imports it and re-executes before anything heavy: the package's model exports are
    lazy, so nothing (JAX, flax, the models) is loaded only to be thrown away."""
    code = ("import sys; from effdet_jax import cpu_malloc; "
            "assert 'jax' not in sys.modules, 'jax was imported'; "
            "import effdet_jax; effdet_jax.efficientdet; assert 'jax' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
