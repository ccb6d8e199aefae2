"""Byte sizes written by people: ``8GiB``, ``500MB``, ``1.5G``, ``4096``.

One parser with one meaning for every option that takes a size
(``extract --max-memory``, ``svd --max-memory``): KiB/MiB/GiB/TiB and the bare
K/M/G/T are binary (powers of 1024, as memory is counted), KB/MB/GB/TB are
decimal, a plain number is bytes.
"""

from __future__ import annotations

import re

from .errors import BadInputError

__all__ = ["parse_bytes"]

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?b)?|(b)?)\s*", re.IGNORECASE)


def parse_bytes(value: int | str) -> int:
    """``"8GiB"`` → 8589934592, ``"1.5G"`` → 1610612736, ``"500MB"`` → 500000000; must be positive."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadInputError(f"size {value!r} must be a number of bytes or a string like 8GiB")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise BadInputError(f"size {value!r} is not a number with an optional unit like 8GiB, 500MB or 1.5G")
        number, unit, suffix = float(m.group(1)), (m.group(2) or "").lower(), (m.group(3) or "").lower()
        power = "kmgt".find(unit) + 1 if unit else 0
        base = 1000 if suffix == "b" else 1024
        size = int(number * base**power)
    if size <= 0:
        raise BadInputError(f"size must be positive, got {value!r}")
    return size
