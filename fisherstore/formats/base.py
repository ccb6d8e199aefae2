"""What a storage backend is: a writer of groups and a reader of row ranges.

Backends only move bytes.  Checksums, sums, the manifest, groups and resume
logic belong to :mod:`fisherstore.writer` and :mod:`fisherstore.store`, so a
new backend implements four small methods and runs the conformance tests in
``tests/test_backends.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..manifest import GroupInfo, TensorInfo, TensorSpec

__all__ = ["Backend", "GroupSink", "Buffer", "rows_of"]

Buffer = bytes | bytearray | memoryview


def rows_of(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, elements per row)`` of a shape: dim 0 is the row axis, 0-d/1-d tensors have 1-element rows."""
    if len(shape) == 0:
        return 1, 1
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return shape[0], per_row


class GroupSink(abc.ABC):
    """Receives one group's tensors, in the planned order, and commits them as a unit."""

    @abc.abstractmethod
    def write_tensor(self, spec: TensorSpec, chunks: Iterable[Buffer]) -> dict[str, Any]:
        """Write a tensor from C-order byte chunks of any sizes; return its manifest ``location``."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make everything written durable (fsync) and visible (rename)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove whatever this sink wrote; the store is as before ``begin_group``."""


class Backend(abc.ABC):
    """A container format for a store's tensors, rooted at a directory."""

    name: ClassVar[str]

    def __init__(self, root: Path, options: dict[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.options = self.parse_options(options or {})

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Validate and complete backend options (stored in the manifest); the default takes none."""
        if options:
            from ..errors import BadInputError

            raise BadInputError(f"backend {cls.name!r} takes no options, got {sorted(options)}")
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

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        """``(file, offset)`` of a tensor's raw contiguous bytes, for zero-copy streaming; ``None`` if encoded."""
        return None

    def finalize(self, tensors: dict[str, TensorInfo], groups: tuple[GroupInfo, ...]) -> None:
        """Write any whole-store side files (e.g. an HF index) after a group commits."""

    def close(self) -> None:
        """Release open files."""
