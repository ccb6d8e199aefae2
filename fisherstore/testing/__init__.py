"""Test helpers that ship with fisherstore: synthetic models and tensors, and the backend contract.

* :func:`tiny_gemma4_config`, :func:`tiny_gemma4_model`, :func:`fisher_like`,
  :func:`fisher_like_tensors` (module :mod:`.synthetic`): a tiny random Gemma-4
  and Fisher-like tensors, for the test-suite, the benchmarks and
  ``--model tiny-gemma4``.
* :func:`write_store`, :func:`assert_same_tensors` (module :mod:`.stores`): a
  store written from in-memory tensors (whole, or some groups of it), and the
  check that a store holds given tensors bit for bit.
* :class:`BackendTests` (module :mod:`.backend`): the conformance tests every
  storage backend and option set passes, as a class to subclass under pytest.
  It is imported on first use (PEP 562), so that importing this package, as
  :mod:`fisherstore.models` does at run time, never imports pytest.
"""

from __future__ import annotations

from typing import Any

from .stores import assert_same_tensors, write_store
from .synthetic import fisher_like, fisher_like_tensors, tiny_gemma4_config, tiny_gemma4_model

__all__ = [
    "BackendTests",
    "assert_same_tensors",
    "fisher_like",
    "fisher_like_tensors",
    "tiny_gemma4_config",
    "tiny_gemma4_model",
    "write_store",
]


def __getattr__(name: str) -> Any:
    if name == "BackendTests":
        from .backend import BackendTests

        return BackendTests
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
