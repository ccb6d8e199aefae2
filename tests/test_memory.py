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


def test_huge_page_hint_leaves_memory_intact():
    import numpy as np

    buf = np.zeros(6 << 20, dtype=np.uint8)
    prefer_huge_pages(buf.ctypes.data, buf.nbytes)  # advises the whole 2 MiB pages inside
    prefer_huge_pages(buf.ctypes.data, 100)  # no whole page inside: nothing to advise
    buf[::4096] = 7
    assert int(buf.sum()) == 7 * len(range(0, 6 << 20, 4096))
