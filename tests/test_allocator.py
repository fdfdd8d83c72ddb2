"""The allocator check: which allocator a process runs with, and the warning for CPU training with glibc malloc."""

import warnings

import pytest

from trainer import allocator
from trainer.allocator import SlowAllocatorWarning, heap_allocator, warn_if_page_faulting_allocator

MAPS = """55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1 /usr/bin/python3.11
7f1c2a000000-7f1c2a200000 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
{extra}7ffd4a000000-7ffd4a021000 rw-p 00000000 00:00 0 [stack]
"""


@pytest.mark.parametrize("line, expected", [
    ("", "system"),
    ("7f1c2b000000-7f1c2b100000 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n", "jemalloc"),
    ("7f1c2b000000-7f1c2b100000 r-xp 00000000 08:01 3 /usr/lib/libtcmalloc_minimal.so.4\n", "tcmalloc"),
    ("7f1c2b000000-7f1c2b100000 r-xp 00000000 08:01 3 /opt/lib/libmimalloc.so.2\n", "mimalloc"),
])
def test_heap_allocator_reads_the_process_memory_map(tmp_path, line, expected):
    maps = tmp_path / "maps"
    maps.write_text(MAPS.format(extra=line))
    assert heap_allocator(str(maps)) == expected


def test_heap_allocator_is_unknown_without_a_memory_map(tmp_path):
    assert heap_allocator(str(tmp_path / "missing")) == "unknown"


def test_heap_allocator_of_this_process_is_a_known_answer():
    assert heap_allocator() in ("system", "unknown", *allocator.ALLOCATORS)


@pytest.mark.parametrize("found, device_type, warns", [
    ("system", "cpu", True), ("jemalloc", "cpu", False), ("unknown", "cpu", False), ("system", "cuda", False),
])
def test_cpu_training_with_the_system_allocator_warns_with_the_fix(monkeypatch, found, device_type, warns):
    monkeypatch.setattr(allocator, "heap_allocator", lambda: found)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_page_faulting_allocator("`beagle train`", device_type)
    slow = [w for w in caught if issubclass(w.category, SlowAllocatorWarning)]
    assert len(slow) == int(warns)
    if warns:
        assert "libjemalloc.so.2" in str(slow[0].message) and "`beagle train`" in str(slow[0].message)
