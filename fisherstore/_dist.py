"""This process's place among torchrun ranks, and the few collectives fisherstore's jobs need.

A process started by ``torchrun`` (``WORLD_SIZE`` > 1 in its environment), or
one whose caller already initialised ``torch.distributed``, is one rank of a
group; any other process is rank 0 of 1, and then nothing here touches
``torch.distributed`` at all (no process group, no store, no threads).

Objects (plans, resume state, error messages) always travel over a gloo
group, whatever backend carries the tensors: NCCL on GPUs, gloo on CPU, or
``$FISHERSTORE_DIST_BACKEND`` when set.  :meth:`Ranks.settle` is the rule
that keeps a failure on one rank from hanging the others: every rank calls
it at the same point, and if any rank failed, every rank raises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from . import errors as _errors
from .errors import FisherStoreError

log = logging.getLogger(__name__)

#: Environment variable that overrides the tensor backend chosen from the device (``gloo``, ``nccl``, ...).
BACKEND_ENV = "FISHERSTORE_DIST_BACKEND"


def launched() -> bool:
    """Whether this process was started as one of several ranks (torchrun sets ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | None) -> str | None:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:$LOCAL_RANK`` under torchrun, one GPU per rank.

    Args:
        device: a device name (``cuda``, ``cuda:1``, ``cpu``) or None.

    Returns:
        The device this rank should use; unchanged outside torchrun or when a GPU index is given.
    """
    if device == "cuda" and launched() and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def default_backend(device: torch.device | str | None) -> str:
    """The tensor backend for ``device``: ``$FISHERSTORE_DIST_BACKEND``, else NCCL on CUDA and gloo elsewhere."""
    override = os.environ.get(BACKEND_ENV)
    if override:
        return override
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


class Ranks:
    """This process's place among torchrun ranks; a lone process is rank 0 of 1.

    ``backend`` is the backend of the default process group when this object
    creates it (it then also destroys it in :meth:`close`); a group the
    caller initialised is used as it is.  Objects travel over a gloo group
    (the default one when it is gloo, else a new gloo group), tensors in
    :meth:`all_reduce` over the default group.
    """

    def __init__(self, backend: str = "gloo", device: torch.device | str | None = None) -> None:
        self.owned = False
        self.group: Any = None
        self.rank, self.world, self.backend = 0, 1, None
        import torch.distributed as dist  # imported by torch itself; nothing is initialised unless launched

        self.dist = dist
        if not dist.is_available() or not (dist.is_initialized() or launched()):
            return
        if not dist.is_initialized():
            if backend == "nccl" and device is not None and torch.device(device).index is not None:
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group(backend)
            self.owned = True
        self.backend = str(dist.get_backend())
        if self.backend != "gloo":
            self.group = dist.new_group(backend="gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        log.info("rank %d of %d (%s)", self.rank, self.world, self.backend)

    def share(self, n: int) -> range:
        """This rank's items of ``0..n-1``: every ``world``-th from its rank (deterministic, sizes differ by <= 1)."""
        return range(self.rank, n, self.world)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None on the other ranks."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_reduce(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (all issued at once, then awaited)."""
        if self.world == 1:
            return
        works = [self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, async_op=True) for t in tensors]
        for work in works:
            if work is not None:
                work.wait()

    def settle(self, failure: Exception | None, what: str) -> None:
        """Fail on every rank if any failed; every rank must call this at the same point.

        The failing rank re-raises its own error; the others raise the first
        failing rank's error again, of the same fisherstore class and naming
        the same parameter when it is one (so the CLI exits 2 on every rank
        for a bad input seen by rank 0 alone), else a FisherStoreError.
        """
        if self.world == 1:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else (type(failure).__name__, str(failure), getattr(failure, "param", None))
        everyone: list[Any] = [None] * self.world
        self.dist.all_gather_object(everyone, mine, group=self.group)
        if failure is not None:
            raise failure
        for rank, seen in enumerate(everyone):
            if seen is not None:
                name, message, param = seen
                cls = getattr(_errors, name, None)
                if not (isinstance(cls, type) and issubclass(cls, FisherStoreError)):
                    cls = FisherStoreError
                raise cls(f"{what} failed on rank {rank}: {message}", param=param)

    def agree(self, failure: Exception | None, errors: Sequence[str], what: str) -> None:
        """Fail on every rank if any failed: the failing rank re-raises its error, the others rank 0's summary.

        ``errors`` are the messages rank 0 collected (ignored elsewhere).  A
        lone process just re-raises.  Without this, one rank's error would
        leave the others blocked in the next collective until its timeout.
        """
        if self.world == 1:
            if failure is not None:
                raise failure
            return
        message = self.broadcast("; ".join(errors) if self.rank == 0 else None)
        if failure is not None:
            raise failure
        if message:
            raise FisherStoreError(f"{what} failed on another rank: {message}")

    def close(self) -> None:
        """Destroy the process group if this object created it."""
        if self.owned:
            self.dist.destroy_process_group()
            self.owned = False
