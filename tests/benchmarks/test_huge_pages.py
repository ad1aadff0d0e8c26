"""``benchmarks/huge_pages.py``: which mappings are collapsed, and that the advice reaches the kernel."""

import mmap
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import huge_pages  # noqa: E402

MIB = 1 << 20


def _mapping(start: int, end: int, perms: str, name: str, rss_kb: int) -> str:
    tail = f" {name}" if name else ""
    return (f"{start:x}-{end:x} {perms} 00000000 00:00 0{tail}\n"
            f"Size: {(end - start) // 1024} kB\nRss: {rss_kb} kB\nVmFlags: rd wr mr mw me ac\n")


def test_only_resident_private_writable_anonymous_ranges_trimmed_to_2mib():
    base = 0x7F0000000000
    smaps = "".join([
        # 9 MiB at a 1 MiB offset, fully resident: trimmed to the 2 MiB pages inside it.
        _mapping(base + 1 * MIB, base + 10 * MIB, "rw-p", "", 9 * 1024),
        # Reserved, barely touched: left alone (collapsing would fill it in).
        _mapping(base + 16 * MIB, base + 32 * MIB, "rw-p", "", 1024),
        # A file mapping, a shared one and a read-only one: not ours to collapse.
        _mapping(base + 32 * MIB, base + 40 * MIB, "rw-p", "/usr/lib/libfoo.so", 8 * 1024),
        _mapping(base + 40 * MIB, base + 48 * MIB, "rw-s", "", 8 * 1024),
        _mapping(base + 48 * MIB, base + 56 * MIB, "r--p", "", 8 * 1024),
        # The brk heap counts; the stack does not.
        _mapping(base + 64 * MIB, base + 68 * MIB, "rw-p", "[heap]", 4 * 1024),
        _mapping(base + 72 * MIB, base + 76 * MIB, "rw-p", "[stack]", 4 * 1024),
        # Resident but smaller than one aligned huge page.
        _mapping(base + 81 * MIB, base + 83 * MIB, "rw-p", "", 2 * 1024),
    ])
    ranges = huge_pages.resident_anonymous_ranges(smaps, min_resident=0.9)
    assert ranges == [(base + 2 * MIB, base + 10 * MIB), (base + 64 * MIB, base + 68 * MIB)]


def test_the_resident_fraction_threshold_is_applied():
    base = 0x7F0000000000
    smaps = _mapping(base, base + 8 * MIB, "rw-p", "", 6 * 1024)  # 75 % resident
    assert huge_pages.resident_anonymous_ranges(smaps, min_resident=0.9) == []
    assert huge_pages.resident_anonymous_ranges(smaps, min_resident=0.7) == [(base, base + 8 * MIB)]


def _vm_flags_of(address: int) -> list[str]:
    header = None
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and ":" not in fields[0]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            header = start <= address < end
        elif header and fields and fields[0] == "VmFlags:":
            return fields[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(sys.platform != "linux" or huge_pages.thp_mode() not in ("always", "madvise"),
                    reason="needs Linux with transparent huge pages enabled")
def test_a_touched_anonymous_buffer_is_advised_huge():
    buffer = mmap.mmap(-1, 16 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # an arena
    buffer.write(b"\x01" * (16 * MIB))  # resident
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    assert "hg" not in _vm_flags_of(address + 8 * MIB)
    assert huge_pages.back_with_huge_pages() >= 12 * MIB  # at least the 6 whole huge pages inside
    # "hg": the range carries MADV_HUGEPAGE, so khugepaged and page faults may use 2 MiB pages
    # there even under transparent_hugepage=madvise.
    assert "hg" in _vm_flags_of(address + 8 * MIB)
    assert buffer[:4] == b"\x01" * 4 and buffer[-4:] == b"\x01" * 4  # contents kept
