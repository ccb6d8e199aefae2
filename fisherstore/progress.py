"""Progress bars for long work, silent when nobody is watching.

Bars go to stderr and are disabled when stderr is not a terminal or when the
CLI's ``--quiet`` called :func:`set_quiet`.  Library code calls
:func:`progress` and never decides about terminals itself.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "set_quiet"]

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    global _quiet
    _quiet = quiet


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual bar), disabled when quiet or not on a TTY."""
    disable = _quiet or not sys.stderr.isatty()
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, file=sys.stderr, **kwargs)
