"""Progress bars for long work, silent when nobody is watching.

Bars go to stderr and are disabled when stderr is not a terminal or when the
CLI's ``--quiet`` called :func:`set_quiet`.  Library code calls
:func:`progress` and never decides about terminals itself.

tqdm is imported only when a bar is actually shown: ``tqdm.auto`` pulls in
asyncio and importlib.metadata (~90 ms), which a ``--quiet`` or piped run
would pay for nothing.  A hidden bar is a :class:`NullBar`, which behaves as
a disabled tqdm bar does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["NullBar", "progress", "set_quiet"]

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) every progress bar of this process."""
    global _quiet
    _quiet = quiet


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm | NullBar[T]:
    """A tqdm bar over ``iterable`` (or a manual bar); a :class:`NullBar` when quiet or not on a TTY."""
    if _quiet or not sys.stderr.isatty():
        return NullBar(iterable, **kwargs)
    from tqdm.auto import tqdm  # only here: its import costs more than many commands' work

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, file=sys.stderr, **kwargs)


class NullBar(Generic[T]):
    """What a disabled tqdm bar does, without importing tqdm: walks ``iterable``, counts nothing, prints nothing."""

    disable = True

    def __init__(
        self,
        iterable: Iterable[T] | None = None,
        *,
        total: float | None = None,
        initial: float = 0,
        leave: bool | None = False,
        desc: str | None = None,
        **_: Any,
    ) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except (TypeError, AttributeError):
                total = None
        self.iterable = iterable
        self.total = None if total == float("inf") else total
        self.n = initial
        self.leave = leave
        self.desc = desc or ""

    def __iter__(self) -> Iterator[T]:
        yield from self.iterable  # type: ignore[misc]  # None: TypeError on first next(), as tqdm

    def __len__(self) -> int:  # as tqdm's
        it = self.iterable
        if it is None:
            return self.total  # type: ignore[return-value]
        if hasattr(it, "shape"):
            return it.shape[0]
        if hasattr(it, "__len__"):
            return len(it)  # type: ignore[arg-type]
        if hasattr(it, "__length_hint__"):
            return it.__length_hint__()
        return self.total  # type: ignore[return-value]

    def __bool__(self) -> bool:  # as tqdm's: an empty bar is false
        if self.total is not None:
            return self.total > 0
        if self.iterable is None:
            raise TypeError("bool() undefined when iterable == total == None")
        return bool(self.iterable)

    def __enter__(self) -> NullBar[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Nothing: a disabled tqdm bar does not count either."""

    def close(self) -> None:
        pass

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc + ": " if desc else ""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        pass
