"""glibc malloc settings for processes that run for months (mallopt through ctypes).

Measured with `make soak`: the supervisor's resident memory crept up ~0.1 MB a minute with
glibc's defaults while nothing in Python grew (tracemalloc flat): a dozen threads each with its
own arena, and numpy's large temporaries (camera frames, sample blocks) served from those arenas
once glibc's dynamic mmap threshold had risen, fragmenting them. Two arenas and a fixed
threshold (large blocks always mmap'd, returned on free) made it flat and 8 MB smaller.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


@functools.cache
def _libc() -> ctypes.CDLL:
    # One handle for the process: each CDLL() makes a new function-pointer class, garbage that
    # lingers until the cyclic collector runs (tracemalloc saw them pile up, one trim a minute).
    return ctypes.CDLL(None)


def tune(*, mmap_threshold: int, trim_threshold: int, arena_max: int | None = None) -> bool:
    """Set the thresholds (fixed values also switch off glibc's dynamic threshold) and, if
    given, the number of arenas. False where this is not glibc."""
    try:
        libc = _libc()
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok &= libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
        if arena_max is not None:
            ok &= libc.mallopt(M_ARENA_MAX, arena_max) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def trim() -> bool:
    """Give the kernel back the free memory inside malloc's heaps, not only at their tops
    (malloc_trim walks every arena; a few hundred microseconds for the supervisor's heaps).
    False where this is not glibc."""
    try:
        _libc().malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def large_blocks_mapped_fresh(threshold: int, *, then_mmap: int, then_trim: int):
    """Within: blocks of `threshold` bytes or more that the heap cannot serve from a free block
    are mmap'd (fresh zero pages, faulted in only where touched: calloc zeroes nothing); after:
    the given thresholds. A free block that large already in the heap is still handed out (and
    zeroed by calloc), so the caller sets the threshold before its first large allocation too
    (worker.serve does)."""
    tune(mmap_threshold=threshold, trim_threshold=then_trim)
    try:
        yield
    finally:
        tune(mmap_threshold=then_mmap, trim_threshold=then_trim)


def tune_for_a_long_running_service() -> bool:
    """The supervisor: many threads, large short-lived arrays, months of uptime."""
    return tune(mmap_threshold=256 << 10, trim_threshold=1 << 20, arena_max=2)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def stats() -> dict[str, int] | None:
    """malloc's own view of this process, in bytes: in_use (handed out, heaps and mmap'd blocks)
    and free (held in the heaps, not given back). None where there is no mallinfo2 (glibc < 2.33,
    or not glibc)."""
    try:
        fn = _libc().mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}
