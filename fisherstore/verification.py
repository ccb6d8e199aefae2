"""Checking a store against its manifest: every tensor's bytes, shape and checksum."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import Checksum
from .errors import ChecksumMismatchError, CorruptDataError
from .progress import progress
from .store import FisherStore, open_store

__all__ = ["Problem", "verify"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store; ``name`` is the tensor (``None`` for the store as a whole)."""

    name: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.name}: {self.message}" if self.name else self.message


def verify(path: str | Path | FisherStore, *, storage_options: Mapping[str, Any] | None = None) -> list[Problem]:
    """Read every tensor once and compare it with the manifest; return the problems found.

    Sources without checksums (a legacy ``fisher.pt``) are checked for
    structure and readability only.

    Args:
        path: a store directory, mask store, ``fisher.pt``, or an open :class:`~fisherstore.store.FisherStore`
            (left open); or an URL of a store (``s3://bucket/store``).
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).

    Returns:
        The problems, in store order; an empty list means the store is sound.
    """
    store = path if isinstance(path, FisherStore) else open_store(path, storage_options=storage_options)
    problems = []
    try:
        incomplete = store.manifest.missing_groups
        if incomplete:
            problems.append(Problem(None, f"incomplete: groups {incomplete} were never written (resume the run)"))
        bar: Any  # a tqdm bar, or a NullBar when quiet
        with progress(total=store.nbytes, desc="verify", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            for name in store.names:
                info = store.info(name)
                checksum, nbytes = Checksum(), 0  # the sum is not rechecked: the checksum covers every byte
                try:
                    for chunk in store.iter_bytes(name):
                        checksum.update(chunk)
                        nbytes += len(chunk)
                        bar.update(len(chunk))
                except CorruptDataError as exc:
                    problems.append(Problem(name, str(exc)))
                    continue
                if nbytes != info.nbytes:
                    problems.append(Problem(name, f"{nbytes} bytes read, {info.nbytes} expected"))
                elif info.checksum and checksum.hexdigest() != info.checksum:
                    mismatch = ChecksumMismatchError.describe(checksum.hexdigest(), info.checksum)
                    problems.append(Problem(name, f"checksum mismatch: {mismatch}"))
    finally:
        if not isinstance(path, FisherStore):
            store.close()
    for p in problems:
        log.debug("verify: %s", p)
    return problems
