"""The one spelling of a content digest in manifests and provenance: ``"sha256:<hex>"``."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["sha256_of", "sha256_tag"]


def sha256_tag(hasher: Any) -> str:
    """``"sha256:"`` followed by the hex digest of a fed ``hashlib.sha256()`` object.

    Args:
        hasher: a ``hashlib.sha256`` object that has seen all the bytes.

    Returns:
        The tagged digest, e.g. ``"sha256:e3b0c4..."``.
    """
    return "sha256:" + hasher.hexdigest()


def sha256_of(raw: bytes) -> str:
    """The tagged digest of ``raw``: ``sha256_tag(hashlib.sha256(raw))``.

    Args:
        raw: the bytes to digest.

    Returns:
        The tagged digest, e.g. ``"sha256:e3b0c4..."``.
    """
    return sha256_tag(hashlib.sha256(raw))
