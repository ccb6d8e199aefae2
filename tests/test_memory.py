"""The process-wide malloc policy (fisherstore._memory): a memory bound outranks speed, in either order.

Each case runs in a fresh interpreter: the setting is process-wide and applied once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fisherstore._memory import PROFILES, prefer_huge_pages

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")

_SCRIPT = """
import json, sys
from fisherstore._memory import tune_allocator
out = []
for purpose in sys.argv[1:]:
    p = tune_allocator(purpose)
    out.append(None if p is None else [p.name, p.mmap_threshold, p.trim_threshold])
print(json.dumps(out))
"""


def _requests(*purposes: str) -> list[list | None]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *purposes], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


REUSE = ["reuse", 32 << 20, 128 << 20]
BOUNDED = ["bounded", 256 << 10, 512 << 10]


@glibc
@pytest.mark.parametrize(
    ("purposes", "expected"),
    [
        (["reuse"], [REUSE]),
        (["bounded"], [BOUNDED]),
        (["reuse", "bounded"], [REUSE, BOUNDED]),  # a later bound replaces the speed setting
        (["bounded", "reuse"], [BOUNDED, BOUNDED]),  # and a later speed request leaves the bound in force
        (["reuse", "reuse", "bounded", "reuse", "bounded"], [REUSE, REUSE, BOUNDED, BOUNDED, BOUNDED]),
    ],
)
def test_a_memory_bound_outranks_buffer_reuse_in_either_order(purposes, expected):
    assert _requests(*purposes) == expected


def test_profiles_are_ranked_bound_over_speed():
    assert PROFILES["bounded"].rank > PROFILES["reuse"].rank
    assert PROFILES["bounded"].mmap_threshold < PROFILES["reuse"].mmap_threshold


def test_huge_page_hint_advises_the_whole_pages_inside_and_leaves_memory_intact(monkeypatch):
    import numpy as np

    from fisherstore import _memory

    real = _memory._madvise()
    calls: list[tuple[int, int, int]] = []

    def recording_madvise(address: int, nbytes: int, advice: int) -> int:
        calls.append((address, nbytes, advice))
        return 0 if real is None else real(address, nbytes, advice)

    monkeypatch.setattr(_memory, "_madvise", lambda: recording_madvise)
    huge = 2 << 20
    expected = (np.arange(6 << 20) % 251).astype(np.uint8)
    buf = expected.copy()  # the pattern is written before the hints
    address = buf.ctypes.data
    prefer_huge_pages(address, buf.nbytes)  # advises the whole 2 MiB pages inside
    start, stop = -(-address // huge) * huge, (address + buf.nbytes) // huge * huge
    assert calls == [(start, stop - start, 14)]  # MADV_HUGEPAGE over the aligned range
    assert address <= start < stop <= address + buf.nbytes and stop - start >= 4 << 20
    calls.clear()
    prefer_huge_pages(address, 100)  # no whole page inside: nothing to advise
    assert calls == []
    assert np.array_equal(buf, expected)
