"""One error hierarchy for the whole library.

Every error fisherstore raises on purpose derives from :class:`FisherStoreError`
and also from the builtin it resembles, so callers may catch either
(``except KeyError`` still works for a missing tensor).  The CLI maps
:class:`BadInputError` (and its children) to exit code 2 and prints
``str(error)`` as the one-line message, so messages name the offending path,
key or value and, where possible, say what to do next.

Messages speak the API's language: parameter names (``rank must be an integer
>= 1, got 0``, ``pass overwrite=True to replace it``).  An error about one
parameter carries its name in :attr:`FisherStoreError.param`, and the CLI
rewrites that name into the command's flag (``--rank``, ``--overwrite``).
"""

from __future__ import annotations

__all__ = [
    "BadInputError",
    "ChecksumMismatchError",
    "CorruptDataError",
    "FisherStoreError",
    "IncompleteStoreError",
    "StoreLockedError",
    "StoreNotFoundError",
    "TensorNotFoundError",
    "UnsafePickleError",
]


class FisherStoreError(Exception):
    """Base class of every error raised by fisherstore.

    Args:
        *args: the message (one line), as for any exception.
        param: the API parameter the error is about, if one; the CLI names its flag instead.
    """

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class BadInputError(FisherStoreError, ValueError):
    """The input (a file, a name, an option) cannot be used as given."""


class CorruptDataError(BadInputError):
    """A file is structurally invalid: truncated, inconsistent header, missing chunk."""


class ChecksumMismatchError(CorruptDataError):
    """A tensor's bytes do not match the checksum recorded in the manifest."""

    @staticmethod
    def describe(got: str, recorded: str, where: str = "the manifest") -> str:
        """The one wording of a mismatch: what the bytes hash to and what ``where`` recorded."""
        return f"bytes hash to {got}, {where} says {recorded}"

    @classmethod
    def for_tensor(cls, name: str, got: str, recorded: str, where: str = "the manifest") -> ChecksumMismatchError:
        """The error for tensor ``name`` read from a source: the mismatch, and what to do about the source."""
        advice = "the source is corrupt (run fisherstore verify on it)"
        return cls(f"tensor {name!r}: {cls.describe(got, recorded, where)}; {advice}")


class UnsafePickleError(BadInputError):
    """A pickle asks for a global or opcode that a safe tensor reader refuses."""


class StoreNotFoundError(BadInputError, FileNotFoundError):
    """The path names no store, no fisher.pt and no mask store."""


class StoreLockedError(FisherStoreError, RuntimeError):
    """Another live process is writing the same destination (one writer at a time); the message names it."""


class TensorNotFoundError(FisherStoreError, KeyError):
    """A tensor name is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "tensor not found"


class IncompleteStoreError(FisherStoreError, RuntimeError):
    """The store's manifest says some groups were never written (resume it first)."""


def check_int(param: str, value: object, minimum: int) -> int:
    """``value`` if it is an integer (not a bool) of at least ``minimum``, else a BadInputError naming ``param``.

    The one wording of an integer parameter's refusal, shared by every config.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadInputError(f"{param} must be an integer >= {minimum}, got {value!r}", param=param)
    return value
