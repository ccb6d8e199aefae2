"""What a storage backend is: a writer of groups and a reader of row ranges.

Backends only move bytes.  Checksums, sums, the manifest, groups and resume
logic belong to :mod:`fisherstore.writer` and :mod:`fisherstore.store`, so a
new backend implements four small methods and passes the conformance suite
``tests/test_backends.py``.  One is an optional speed-up: a backend that
can decode into a caller's buffer overrides :meth:`Backend.read_rows_into`,
which keeps conversion and verify free of the torch import.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from .._io import FileSpan
from ..errors import BadInputError
from ..manifest import GroupInfo, TensorInfo, TensorSpec
from ..storage import Remote

if TYPE_CHECKING:
    import torch

__all__ = ["Backend", "Buffer", "FileSpan", "GroupSink", "Piece", "RowsInto", "check_rows", "rows_of", "rows_shape"]

Buffer = bytes | bytearray | memoryview
#: A piece of a tensor's bytes as a source hands it out: bytes, or raw bytes left in a file (read by whoever
#: consumes them).  Pieces have any size; "chunk" means only a zarr chunk.
Piece = Buffer | FileSpan
#: ``read_rows_into(info, start, stop, out)``: rows ``[start, stop)``'s C-order bytes into ``out`` (exactly their
#: size): :meth:`Backend.read_rows_into`, and the optional capability of a tensor source (``fisherstore.store``).
RowsInto = Callable[[TensorInfo, int, int, memoryview], None]


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, elements per row)`` of a shape: dim 0 is the row axis, 0-d/1-d tensors have 1-element rows."""
    if len(shape) == 0:
        return 1, 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return shape[0], per_row


def rows_shape(shape: tuple[int, ...], start: int, stop: int) -> tuple[int, ...]:
    """The shape of rows ``[start, stop)`` of ``shape``: a 0-d tensor's one row is itself, no row is ``(0,)``."""
    if shape:
        return (stop - start, *shape[1:])
    return () if stop > start else (0,)


def check_rows(name: str, start: int, stop: int, nrows: int) -> None:
    """Refuse a row range ``[start, stop)`` outside ``0 <= start <= stop <= nrows``: every reader's one check."""
    if not 0 <= start <= stop <= nrows:
        raise BadInputError(f"rows [{start}, {stop}) out of range for {name!r} with {nrows} rows", param="rows")


class GroupSink(abc.ABC):
    """Receives one group's tensors, in the planned order, and commits them as a unit."""

    @abc.abstractmethod
    def write_tensor(self, spec: TensorSpec, pieces: Iterable[Buffer], *, held: int = 0) -> dict[str, Any]:
        """Write a tensor from C-order byte buffers of any sizes; return its manifest ``location``.

        A buffer is valid until ``held + 1`` further ones have been requested
        (by default, only until the next one).
        """

    def pieces(self, spec: TensorSpec) -> tuple[int, int] | None:
        """``(piece_bytes, held)``: how :meth:`write_tensor` would like ``spec``'s bytes, or ``None`` for any way.

        The writer then hands over pieces of ``piece_bytes`` counted from the
        tensor's start, each valid for ``held`` more pieces (its read-ahead
        ring is that much bigger), so that a sink which keeps pieces in flight,
        such as whole chunks being compressed, need not copy them.
        """
        return None

    @abc.abstractmethod
    def commit(self) -> None:
        """Make everything written durable (fsync) and visible (rename)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove whatever this sink wrote; the store is as before ``begin_group``."""


class Backend(abc.ABC):
    """A container format for a store's tensors, rooted at a directory."""

    name: ClassVar[str]

    def __init__(self, root: Path | Remote, options: dict[str, Any] | None = None) -> None:
        #: Where the store is on an object store (fsspec), else None: ``root`` is then a local directory.
        self.remote: Remote | None = root if isinstance(root, Remote) else None
        self.root = Path(root.root if isinstance(root, Remote) else root)
        self.options = self.parse_options(options or {})

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Validate and complete backend options (stored in the manifest); the default takes none."""
        if options:
            raise BadInputError(
                f"backend {cls.name!r} takes no options, got {sorted(options)}", param="backend_options"
            )
        return {}

    @abc.abstractmethod
    def begin_group(self, group: GroupInfo, num_groups: int) -> GroupSink:
        """Start writing ``group`` (its tensors come in ``group.tensors`` order)."""

    @abc.abstractmethod
    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor as a CPU tensor of the stored dtype.

        Reads only the bytes of those rows (plus at most one chunk either side
        for chunked formats).  Raises :class:`~fisherstore.errors.CorruptDataError`
        when the bytes are missing or short.
        """

    def read_rows_into(self, info: TensorInfo, start: int, stop: int, out: memoryview) -> None:
        """Rows ``[start, stop)``'s C-order bytes into ``out`` (exactly their size).

        Byte-moving code (conversion, verify) reads through this, so a backend
        that overrides it lets them run without importing torch; this default
        goes through :meth:`read_rows`.
        """
        import torch

        out[:] = self.read_rows(info, start, stop).reshape(-1).view(torch.uint8).numpy().data

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        """``(file, offset)`` of a tensor's raw contiguous bytes, for zero-copy streaming; ``None`` if encoded."""
        return None

    def check_metadata(self, info: TensorInfo) -> None:  # noqa: B027 - optional: a backend with no metadata
        """Raise :class:`~fisherstore.errors.CorruptDataError` where the container's own metadata of a tensor
        (a shard header, an array's ``zarr.json``) disagrees with ``info`` or is missing; reads no tensor bytes.

        ``fisherstore info`` runs it on every tensor, so that a store whose
        files say another dtype or shape than its manifest is refused there,
        not first by ``convert`` or ``verify``.
        """

    def finalize(self, tensors: dict[str, TensorInfo], groups: tuple[GroupInfo, ...]) -> None:  # noqa: B027 - optional
        """Write any whole-store side files (e.g. an HF index) after a group commits."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release open files."""
