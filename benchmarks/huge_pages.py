"""Back a process's resident anonymous memory with transparent huge pages (Linux).

The benchmarks call it in every measured process, on both sides, after the first call: the speed
of a small case can differ between fresh processes of the same code, and the difference follows
the memory backing (address translation over 4 KiB pages), not the code (``RESULTS.md``). With
``transparent_hugepage=madvise`` (the usual default) nothing gets huge pages unless asked, and
tcmalloc does not ask.

Only mappings that are at least ``min_resident`` resident are collapsed, so reserved but untouched
address space (allocator arenas, thread stacks) is not filled in. Call it after the first step,
when the step's buffers exist; allocators reuse them, so the backing stays. Stdlib only (the
PyTorch side of the benchmarks imports it too).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import pathlib
import sys

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux >= 6.1; older kernels answer EINVAL and khugepaged does it later
THP_ENABLED = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's THP setting (``always``, ``madvise`` or ``never``), or ``unavailable``."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def resident_anonymous_ranges(smaps: str, min_resident: float) -> list[tuple[int, int]]:
    """``(start, end)`` of writable private anonymous mappings (and ``[heap]``) in ``smaps`` text
    (``/proc/<pid>/smaps``) that are at least ``min_resident`` resident, trimmed inwards to
    2 MiB boundaries; ranges shorter than one huge page are left out."""
    ranges = []
    header, rss = None, 0
    for line in smaps.splitlines() + [""]:
        fields = line.split()
        is_header = bool(fields) and "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]
        if (is_header or not line) and header is not None:
            start, end = header
            if rss >= min_resident * (end - start):
                lo = -(-start // HUGE_PAGE) * HUGE_PAGE
                hi = end // HUGE_PAGE * HUGE_PAGE
                if hi > lo:
                    ranges.append((lo, hi))
            header = None
        if is_header:
            perms, name = fields[1], fields[5] if len(fields) > 5 else ""
            if perms.startswith("rw") and perms.endswith("p") and name in ("", "[heap]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                header, rss = (start, end), 0
        elif header is not None and fields and fields[0] == "Rss:":
            rss = int(fields[1]) * 1024
    return ranges


def back_with_huge_pages(min_resident: float = 0.9) -> int:
    """Advise and collapse this process's resident anonymous memory into huge pages.

    Returns the bytes advised (0 when THP is off or unavailable, or off Linux). Best effort: a
    range the kernel cannot collapse now is still advised, and khugepaged may do it later.
    """
    if sys.platform != "linux" or thp_mode() not in ("always", "madvise"):
        return 0
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    smaps = pathlib.Path("/proc/self/smaps").read_text()
    advised = 0
    for lo, hi in resident_anonymous_ranges(smaps, min_resident):
        if libc.madvise(lo, hi - lo, MADV_HUGEPAGE) == 0:
            advised += hi - lo
            libc.madvise(lo, hi - lo, MADV_COLLAPSE)
    return advised
