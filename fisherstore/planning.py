"""How big an extraction's layer groups are, from the memory they need: :class:`ExtractPlan`.

The one place where an extraction's memory is estimated.  For a group size
``s`` (decoder layers per group) the device must hold, beside the model
itself (already loaded, so not in the budget):

* ``accumulators``: one fp32 accumulator per target weight of the group
  (the largest group of the plan);
* ``gradient``: one weight's gradient in the compute dtype, the largest
  target, plus its fp32 copy when the compute dtype is not fp32 (the
  post-accumulate hook squares ``grad.float()`` and frees the gradient at
  once, so only one per-weight gradient is alive at a time);
* ``boundary_states``, ``boundary_grads``, ``boundary_kwargs`` (pipelined
  schedule, more than one group): the hidden state recorded at the input of
  each group below the top one (``prompts x tokens x hidden`` per boundary),
  one boundary's upstream gradients (the same size), and the decoder layers'
  recorded call arguments (per prompt: cos/sin of every attention type,
  ``tokens x head_dim`` each, position ids, and a ``tokens x tokens``
  boolean mask per attention type, counted whether or not the attention
  implementation materialises it);
* ``activations``: one prompt's (the longest) saved activations, estimated
  from the config as ``layers x tokens x hidden x factor`` elements of the
  compute dtype with ``factor = 8 + 4 * intermediate / hidden`` (norm
  outputs, q/k/v/o inputs, residuals, and gate/up/activation/product of the
  MLP), plus ``heads x tokens x tokens x 2`` per layer under eager attention,
  plus the head: ``tokens x vocab`` logits in the compute dtype, their fp32
  copy and its gradient.  ``layers`` is the group's size under the pipelined
  schedule (each group re-runs only its own layers) and every decoder layer
  under the naive one (the lowest group back-propagates through all of them).

The budget is ``max_memory`` when given; otherwise the free memory of the
devices holding the target weights (``torch.cuda.mem_get_info`` plus what
PyTorch's caching allocator holds unused, the smallest over the devices of
a device map; ``MemAvailable`` of ``/proc/meminfo`` on the CPU) less a
margin of 10% (at least 512 MiB).  ``auto`` picks the largest group whose
total fits with the boundary tensors on the device; on CUDA, when none
does, the boundary tensors move to pinned CPU memory and the largest group
fitting without them is taken.  The plan is recorded in the store's
provenance (``plan``), and a resumed run uses it rather than re-deriving it
from a budget that may have changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError
from .manifest import MANIFEST_NAME, Manifest, TensorSpec
from .sizes import parse_bytes
from .storage import Remote
from .store import load_manifest
from .writer import plan_groups

__all__ = [
    "BOUNDARY_PLACES",
    "MARGIN_FRACTION",
    "MIN_MARGIN_BYTES",
    "ExtractPlan",
    "ModelShape",
    "available_memory",
    "estimate",
    "plan_extraction",
    "recorded_plan",
]

log = logging.getLogger(__name__)

#: Share of the free memory left unused by an automatic budget (fragmentation, kernels' workspaces).
MARGIN_FRACTION = 0.10
#: The smallest margin an automatic budget leaves.
MIN_MARGIN_BYTES = 512 << 20

#: Where boundary tensors are kept: on the device of the layer using them, in (pinned) CPU memory, or
#: nowhere (one group, or the naive schedule, records none).
BOUNDARY_PLACES = ("device", "cpu", "none")

_ITEMS = (
    "accumulators",
    "gradient",
    "boundary_states",
    "boundary_grads",
    "boundary_kwargs",
    "activations",
)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model: sizes from its config and its compute dtype."""

    hidden: int
    intermediate: int
    vocab: int
    heads: int
    head_dim: int
    attention_types: int
    dtype_bytes: int
    eager_attention: bool = False

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        """Read the shape of a transformers causal LM from its config (text config of multimodal ones).

        Args:
            model: the model, already loaded in its compute dtype.

        Returns:
            Its hidden, intermediate and vocabulary sizes, heads, attention types and dtype width.
        """
        outer = getattr(model, "config", None)
        config = getattr(outer, "text_config", None) or outer
        hidden = _size(config, "hidden_size")
        heads = _size(config, "num_attention_heads") or 1
        intermediate = _size(config, "intermediate_size") or 4 * hidden
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        param = next(model.parameters())
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            vocab=_size(config, "vocab_size"),
            heads=heads,
            head_dim=_size(config, "head_dim") or (hidden // heads if hidden else 0),
            attention_types=len(types),
            dtype_bytes=param.element_size(),
            eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        )


def _size(config: Any, name: str) -> int:
    """A size from a config; a per-layer one (Gemma-4's head_dim) is the largest over the layers; 0 if absent."""
    try:
        return int(getattr(config, name, 0) or 0)
    except Exception:  # transformers refuses global access to heterogeneous per-layer attributes
        layers = config.per_layer_config
        return max(int(getattr(layers[i], name, 0) or 0) for i in range(config.num_hidden_layers))


@dataclass(frozen=True)
class ExtractPlan:
    """An extraction's group size, the memory budget it was chosen under, and the estimate behind it.

    ``source`` says how the group size was chosen: ``auto`` (the largest that
    fits ``budget_bytes``), ``group_size`` (given), or ``recorded`` (read back
    from the store being resumed).  ``budget_source`` names the budget:
    ``max_memory``, ``cuda:N free memory less margin`` or ``MemAvailable less
    margin``.  ``estimated`` holds bytes by item (see the module docstring)
    and their ``total`` on the device; ``boundary`` is where boundary tensors
    are kept (:data:`BOUNDARY_PLACES`).  ``fits`` is false when even the chosen
    group's estimate exceeds the budget (the run still goes ahead: the
    estimate is conservative).
    """

    group_size: int
    source: str
    budget_bytes: int
    budget_source: str
    boundary: str
    estimated: Mapping[str, int] = field(default_factory=dict)
    fits: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-able dict (what the manifest's provenance records under ``plan``)."""
        return {
            "group_size": self.group_size,
            "source": self.source,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "boundary": self.boundary,
            "estimated": dict(self.estimated),
            "fits": self.fits,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExtractPlan:
        """A plan read back from :meth:`to_dict`'s form; malformed input is a BadInputError."""
        try:
            plan = cls(
                group_size=int(d["group_size"]),
                source=str(d["source"]),
                budget_bytes=int(d["budget_bytes"]),
                budget_source=str(d["budget_source"]),
                boundary=str(d["boundary"]),
                estimated={str(k): int(v) for k, v in dict(d.get("estimated", {})).items()},
                fits=bool(d.get("fits", True)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"the recorded extraction plan is malformed ({exc!r})", param="plan") from None
        if plan.group_size < 1 or plan.boundary not in BOUNDARY_PLACES:
            raise BadInputError(f"the recorded extraction plan is malformed ({dict(d)!r})", param="plan")
        return plan

    def describe(self) -> str:
        """One line for people: group size and why, the budget, the estimate by item."""
        items = ", ".join(f"{k} {_mib(v)}" for k, v in self.estimated.items() if k != "total" and v)
        over = "" if self.fits else " (over the budget: the smallest group does not fit the estimate)"
        return (
            f"group size {self.group_size} ({self.source}); budget {_mib(self.budget_bytes)} from "
            f"{self.budget_source}; estimated {_mib(self.estimated.get('total', 0))} on the device{over}"
            f" ({items}); boundary tensors: {self.boundary}"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def estimate(
    specs: Sequence[TensorSpec],
    size: int,
    shape: ModelShape,
    tokens: Sequence[int],
    schedule: str,
    *,
    boundary_on_device: bool = True,
) -> dict[str, int]:
    """Bytes by item (module docstring) for groups of ``size`` decoder layers, and their ``total`` on the device.

    Args:
        specs: the target weights, in plan order (layers from their names).
        size: decoder layers per group.
        shape: the model's sizes and compute dtype (:meth:`ModelShape.of`).
        tokens: each prompt's token count.
        schedule: ``pipelined`` or ``naive``.
        boundary_on_device: count the boundary tensors in the device total (else they are kept in CPU memory).

    Returns:
        ``{item: bytes}`` for every item, plus ``total``.
    """
    groups = plan_groups(specs, size)
    num_layers = len(plan_groups(specs, 1))
    b = shape.dtype_bytes
    largest = max(t.numel for t in specs)
    items = dict.fromkeys(_ITEMS, 0)
    items["accumulators"] = max(4 * sum(t.numel for t in g.tensors) for g in groups)
    items["gradient"] = largest * b + (4 * largest if b != 4 else 0)
    total_tokens, longest = sum(tokens), max(tokens, default=0)
    if schedule == "pipelined" and len(groups) > 1:
        per_boundary = total_tokens * shape.hidden * b
        items["boundary_states"] = (len(groups) - 1) * per_boundary
        items["boundary_grads"] = per_boundary
        items["boundary_kwargs"] = sum(
            shape.attention_types * (2 * n * shape.head_dim * b + n * n) + 8 * n for n in tokens
        )
    layers = size if schedule == "pipelined" else num_layers
    per_layer = longest * shape.hidden * (8 + 4 * shape.intermediate / max(shape.hidden, 1)) * b
    if shape.eager_attention:
        per_layer += 2 * shape.heads * longest * longest * b
    items["activations"] = int(min(layers, num_layers) * per_layer) + longest * shape.vocab * (b + 8)
    boundary = items["boundary_states"] + items["boundary_grads"]
    items["total"] = sum(items[k] for k in _ITEMS) - (0 if boundary_on_device else boundary)
    return items


def available_memory(devices: Sequence[torch.device]) -> tuple[int, str]:
    """The automatic budget: free memory of ``devices`` less the margin, and where that figure came from.

    Args:
        devices: the devices holding the target weights (CUDA devices: the smallest free memory of them).

    Returns:
        ``(bytes, source)``, e.g. ``(21474836480, "MemAvailable less margin")``.
    """
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    if cuda:
        free = {}
        for d in cuda:
            device_free, _ = torch.cuda.mem_get_info(d)
            free[d] = device_free + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
        tight = min(free, key=lambda d: free[d])
        raw, source = free[tight], f"{tight} free memory less margin"
    else:
        raw, source = _mem_available(), "MemAvailable less margin"
    return max(0, raw - max(int(raw * MARGIN_FRACTION), MIN_MARGIN_BYTES)), source


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan_extraction(
    specs: Sequence[TensorSpec],
    shape: ModelShape,
    tokens: Sequence[int],
    *,
    schedule: str,
    devices: Sequence[torch.device],
    group_size: int | str = "auto",
    max_memory: int | str | None = None,
) -> ExtractPlan:
    """Choose the group size (``auto``) or check a given one, and where boundary tensors go.

    ``auto`` is the largest group whose estimated total fits the budget with
    the boundary tensors on the device; on CUDA, when no group does, the
    boundary tensors go to pinned CPU memory and the largest group fitting
    without them is taken.  When nothing fits an explicit ``max_memory`` the
    run is refused; when nothing fits the free memory, one layer per group is
    used, with a warning (the estimate is an upper bound).

    Args:
        specs: the target weights, in plan order.
        shape: the model's sizes and compute dtype.
        tokens: each prompt's token count.
        schedule: the schedule that will run, ``pipelined`` or ``naive``.
        devices: the devices holding the target weights.
        group_size: ``"auto"`` or decoder layers per group.
        max_memory: the budget (``"40GiB"``, bytes); default: free memory less the margin.

    Returns:
        The plan.
    """
    if max_memory is not None:
        try:
            budget, budget_source = parse_bytes(max_memory), "max_memory"
        except BadInputError as exc:
            raise BadInputError(f"max_memory: {exc}", param="max_memory") from None
    else:
        budget, budget_source = available_memory(devices)
    cuda = any(d.type == "cuda" for d in devices)
    num_layers = len(plan_groups(specs, 1))

    def plan(size: int, on_device: bool, source: str) -> ExtractPlan:
        est = estimate(specs, size, shape, tokens, schedule, boundary_on_device=on_device)
        none = est["boundary_states"] == 0
        place = "none" if none else "device" if on_device else "cpu"
        return ExtractPlan(size, source, budget, budget_source, place, est, fits=est["total"] <= budget)

    if group_size != "auto":
        given = plan(int(group_size), True, "group_size")
        return given if given.fits or not cuda else plan(int(group_size), False, "group_size")
    sizes = range(num_layers, 0, -1)
    for on_device in (True, False) if cuda else (True,):
        fitting = next((p for p in (plan(s, on_device, "auto") for s in sizes) if p.fits), None)
        if fitting is not None:
            return fitting
    smallest = plan(1, not cuda, "auto")
    if budget_source == "max_memory":
        raise BadInputError(
            f"max_memory {max_memory}: the smallest group (one layer) needs {smallest.estimated['total']} bytes "
            f"({', '.join(f'{k} {v}' for k, v in smallest.estimated.items() if k != 'total' and v)}); "
            "raise the budget",
            param="max_memory",
        )
    log.warning("%s; using it anyway", smallest.describe())
    return smallest


def recorded_plan(out: str | Path | Remote) -> ExtractPlan | None:
    """The plan recorded in the store at ``out`` (a run being resumed), or None where there is none.

    Stores written before plans were recorded give their provenance's ``group_size``.

    Args:
        out: the store directory, or its :class:`~fisherstore.storage.Remote` on an object store.

    Returns:
        The recorded plan with ``source="recorded"``, or None when ``out`` has no manifest or no group size.
    """
    if isinstance(out, Remote):
        if not out.exists(MANIFEST_NAME):
            return None
        provenance = load_manifest(out).provenance
    else:
        path = Path(out) / MANIFEST_NAME
        if not path.is_file():
            return None
        provenance = Manifest.load(path).provenance
    if isinstance(provenance.get("plan"), Mapping):
        return replace(ExtractPlan.from_dict(provenance["plan"]), source="recorded")
    if isinstance(provenance.get("group_size"), int):
        return ExtractPlan(int(provenance["group_size"]), "recorded", 0, "the store's provenance", "device")
    return None
