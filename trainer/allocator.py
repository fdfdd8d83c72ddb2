"""Which heap allocator this process runs with, and what it costs CPU training.

glibc's malloc returns large freed blocks to the kernel, so a CPU training step that allocates and frees hundreds of
megabytes of activations (the draft's logits alone: 16 x 512 x 8,192 floats = 268 MB) page-faults all of them in again
on the next step. In the shipped recipe on the project's AMD EPYC (2 cores, fp32) that was ~105,000 minor page faults
per second, half the CPU time in the kernel and 6.8 s per stage-1 step; the same command with jemalloc preloaded
(freed memory kept for reuse) ran at ~30 faults per second and 4.5 s per step. GPUs are unaffected (torch caches CUDA
memory itself).

`beagle train` on a CPU with the system allocator warns once (`SlowAllocatorWarning`) with the command to fix it, and
the compute ledger and `beagle bench` record which allocator ran, so timings stay comparable.
"""

import warnings

ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

JEMALLOC_COMMAND = ('LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1" beagle train ... '
                    '(Debian/Ubuntu: apt install libjemalloc2)')


class SlowAllocatorWarning(UserWarning):
    """CPU training runs with an allocator that returns freed memory to the kernel on every step."""


def heap_allocator(maps_path: str = "/proc/self/maps") -> str:
    """The allocator loaded into this process: "jemalloc", "tcmalloc" or "mimalloc" (preloaded with LD_PRELOAD),
    "system" when none of them is mapped (glibc's malloc on Linux), "unknown" where the process's memory map cannot
    be read (not Linux)."""
    try:
        with open(maps_path) as handle:
            maps = handle.read()
    except OSError:
        return "unknown"
    return next((name for name in ALLOCATORS if f"/lib{name}" in maps), "system")


def warn_if_page_faulting_allocator(what: str, device_type: str) -> None:
    """Warn that `what` on a CPU runs with the system allocator, and say how to run it with jemalloc."""
    if device_type == "cpu" and heap_allocator() == "system":
        warnings.warn(f"{what} on the CPU with the system allocator (glibc malloc): large tensors freed at each step "
                      f"are returned to the kernel and page-faulted back on the next (measured: 6.8 s/step with "
                      f"it, 4.5 s/step with jemalloc on a 2-core EPYC). Run with jemalloc: {JEMALLOC_COMMAND}.",
                      SlowAllocatorWarning, stacklevel=2)
