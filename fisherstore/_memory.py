"""Process-wide memory hints: one policy for glibc's malloc thresholds, and transparent huge pages.

glibc's malloc serves a block at or above its *mmap threshold* with its own
``mmap`` (unmapped again on ``free``, so it leaves RSS at once, but every
reuse costs fresh page faults) and smaller ones from the heap (reused without
faults, but fragmentation keeps freed pages resident).  By default the
threshold rises to the size of each large block freed.  Two parts of
fisherstore want it fixed, in opposite directions:

* ``"reuse"`` (compressed zarr writes): every compressed ~4 MiB chunk is a
  fresh ``bytes``; mapping and unmapping each cost ~1,000 page faults
  (measured on 2.2 GB: 305k faults and 3.5 s of system time, against 23k
  and 1.9 s with mmap threshold 32 MiB and trim threshold 128 MiB, the same
  as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the environment).
* ``"bounded"`` (an SVD that streams a tensor in row blocks because the
  caller capped its memory): with the heap serving equal ~10 MB blocks,
  stale pages stayed resident, +25..35 MiB over a 32 MiB ``max_memory``;
  mmap threshold 256 KiB makes a freed block leave RSS, for ~1 ms of page
  faults per 10 MB block (trim threshold twice that, glibc's own ratio, so
  that a ``"reuse"`` trim threshold applied before does not keep 128 MiB of
  free heap resident).

The rule, since both run in one process when an SVD writes a compressed
zarr mask store: **a memory bound outranks speed**.  ``"bounded"`` is applied
whenever it is asked for, replacing ``"reuse"``; ``"reuse"`` is applied only
while nothing outranks it.  Each profile is applied at most once per process,
so :func:`tune_allocator` is cheap to call on every use.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

from ._io import c_function

__all__ = ["PROFILES", "AllocatorProfile", "prefer_huge_pages", "tune_allocator"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class AllocatorProfile:
    """A glibc malloc setting: its name, its rank (higher wins) and the two thresholds it sets, in bytes."""

    name: Literal["reuse", "bounded"]
    rank: int
    mmap_threshold: int
    trim_threshold: int


#: The profiles, by name (module docstring: what each is for, and why the higher rank wins).
PROFILES: dict[str, AllocatorProfile] = {
    "reuse": AllocatorProfile("reuse", 1, mmap_threshold=32 << 20, trim_threshold=128 << 20),
    "bounded": AllocatorProfile("bounded", 2, mmap_threshold=256 << 10, trim_threshold=512 << 10),
}

_lock = threading.Lock()
_applied: AllocatorProfile | None = None


@functools.cache
def _mallopt() -> Any:
    """glibc's ``mallopt``, or None where the C library has none."""
    return c_function(None, "mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def tune_allocator(purpose: Literal["reuse", "bounded"]) -> AllocatorProfile | None:
    """Ask for the malloc profile ``purpose`` for this process; apply it unless a higher-ranked one is in force.

    Args:
        purpose: ``"reuse"`` (keep freed multi-MiB blocks for reuse: fewer
            page faults) or ``"bounded"`` (return freed blocks of 256 KiB or
            more to the OS: RSS follows what is live).

    Returns:
        The profile in force after the call (``purpose``'s or one that
        outranks it), or ``None`` where the C library is not glibc and
        nothing was applied.
    """
    global _applied
    wanted = PROFILES[purpose]
    with _lock:
        if _applied is not None and _applied.rank >= wanted.rank:
            if _applied is not wanted:
                log.debug("malloc profile %r kept: it outranks %r", _applied.name, purpose)
            return _applied
        mallopt = _mallopt()
        if mallopt is None:
            log.debug("mallopt unavailable: malloc profile %r not applied", purpose)
            return None
        mallopt(_M_MMAP_THRESHOLD, wanted.mmap_threshold)
        mallopt(_M_TRIM_THRESHOLD, wanted.trim_threshold)
        _applied = wanted
        return wanted


_MADV_HUGEPAGE = 14  # Linux <sys/mman.h>
_HUGE_PAGE = 2 << 20


@functools.cache
def _madvise() -> Any:
    """The C library's ``madvise``, or None where it has none."""
    return c_function(None, "madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)


def prefer_huge_pages(address: int, nbytes: int) -> None:
    """Ask Linux to back the fresh, untouched memory ``[address, address + nbytes)`` with 2 MiB pages.

    Filling a new 460 MB matrix takes ~110k page faults with 4 KiB pages,
    which costs more than widening bf16 to fp32 (measured: 60 ms vs 16 ms
    to load 64 MB).  With transparent huge pages in the common ``madvise``
    mode, this hint cuts the faults 512-fold.  Only the whole huge pages
    inside the range are advised; a no-op where madvise or THP is unavailable.
    """
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    stop = (address + nbytes) // _HUGE_PAGE * _HUGE_PAGE
    madvise = _madvise() if stop > start else None
    if madvise is not None:
        madvise(start, stop - start, _MADV_HUGEPAGE)
