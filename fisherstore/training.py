"""Using Fisher masks and layer importance while training PEFT LoRA adapters.

Two hooks, usable from a plain PyTorch loop (:func:`attach_training`) and from
HF ``Trainer`` / TRL ``SFTTrainer`` (:class:`FisherTrainerCallback`):

**Subspace projector** (:class:`SubspaceProjector`).  A LoRA-adapted linear
``W`` (out × in) learns ``ΔW = s_lora·B·A`` with ``B`` out × r and ``A`` r × in.
For the Fisher tensor of ``W`` the mask store holds the top-k singular
vectors ``U`` (out × k) and ``V`` (in × k).  The projector keeps

    Uᵀ ΔW = 0   and   ΔW V = 0

by removing ``B``'s column-space component along ``U`` and ``A``'s row-space
component along ``V``::

    B ← B − s·U(UᵀB)        A ← A − s·(AV)Vᵀ        (s = strength)

Together the two sides give ``ΔW = (I − UUᵀ) ΔW (I − VVᵀ)``: ΔW is cut out
of the whole row and column spaces of the top-k modes, which is stronger
than being orthogonal to the k rank-1 directions ``u_i v_iᵀ``.

``ΔW`` here is measured against the base weight, i.e. it is everything the
adapter adds (``get_delta_weight`` in PEFT).  With PEFT's default init
``B = 0`` the initial ΔW is zero, but ``A`` starts random with ``AV ≠ 0``; a
gradient-only scheme would leave that component in ``A`` forever and
``ΔW V = B·A₀V`` would grow with ``B``.  Both ``B`` and ``A`` are therefore
projected once when the projector attaches (which also covers adapters that
start from a non-zero ``B``: loaded checkpoints, PiSSA-style inits), and then:

* ``mode="param"`` (default): both are projected again after every optimizer
  step.  The invariant holds after each step for **any** optimizer (Adam,
  weight decay, momentum, clipping), because it is imposed on the parameters.
* ``mode="grad"``: the gradients of ``B`` and ``A`` are projected as they are
  computed.  With SGD (with or without momentum, coupled or decoupled weight
  decay) every update is a linear combination of projected gradients and of
  the parameters themselves, so the invariant holds too.  Adam's elementwise
  ``m/√v`` is not a linear map and rotates the update back into the subspace:
  with Adam/AdamW the invariant leaks (the tests measure it).

Gradient work runs in tensor hooks (``Tensor.register_hook``), which see each
backward pass's own gradient before it is added into ``.grad``.  A hook on
the accumulated ``.grad`` (post-accumulate-grad) would apply a non-idempotent
map — a strength below 1, or a layer factor — once per micro-batch to the
running sum under gradient accumulation, compounding it.

Masks are read lazily, one tensor per adapted module, onto that module's
device and dtype, and re-orthonormalised (thin QR in fp32) on the way: masks
stored in bf16 are orthonormal only to ~1e-3, which would cap how exactly the
projection removes the subspace.  Memory held: Σ (out + in)·r·bytes.

**Layer scaler** (:class:`LayerScaler`).  Layer importance (the Fisher
summed per decoder layer) becomes one factor per layer by a
:class:`ScaleRule`; each layer's LoRA gradients are multiplied by exactly its
factor.  :func:`format_factor_table` prints the mapping.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .errors import BadInputError
from .importance import load_importance
from .naming import KINDS, canonical_name, parse_name

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = [
    "LORA_VARIANTS",
    "MODES",
    "REFERENCES",
    "Coverage",
    "FisherTrainerCallback",  # noqa: F822 - built on first access by __getattr__ (imports transformers)
    "LayerScaler",
    "MaskSource",
    "ProjectorConfig",
    "ScaleRule",
    "SubspaceProjector",
    "TrainingHooks",
    "attach_training",
    "format_factor_table",
    "lora_modules",
    "lora_variant_of_config",
    "project_lora_",
    "subspace_leak",
]

log = logging.getLogger(__name__)

#: Projection modes: project parameters after each optimizer step, or gradients during backward.
MODES: tuple[str, ...] = ("param", "grad")
#: What a layer's importance is divided by before the power is applied (see :class:`ScaleRule`).
REFERENCES: tuple[str, ...] = ("geomean", "mean", "median", "max")


class MaskSource(Protocol):
    """What the projector reads masks through (``fisherstore.masks.open_masks`` returns one)."""

    @property
    def names(self) -> Sequence[str]: ...

    @property
    def rank(self) -> int: ...

    def __contains__(self, name: object) -> bool: ...

    def get(
        self, name: str, rank: int | None = None, device: Any = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- numerics


def project_lora_(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0) -> None:
    """In place: ``B ← B − s·U(UᵀB)`` and ``A ← A − s·(AV)Vᵀ``.

    ``U`` (out × r) and ``V`` (in × r) must have orthonormal columns; then
    ``s = 1`` makes ``UᵀB = 0`` and ``AV = 0`` and ``s`` in (0, 1) removes
    that fraction of the in-subspace component and leaves the rest of ``B``
    and ``A`` untouched.
    """
    with torch.no_grad():
        B.addmm_(U, U.T @ B, alpha=-strength)
        A.addmm_(A @ V, V.T, alpha=-strength)


def _left_grad(grad: torch.Tensor, U: torch.Tensor, strength: float) -> torch.Tensor:
    return torch.addmm(grad, U, U.T @ grad, alpha=-strength)


def _right_grad(grad: torch.Tensor, V: torch.Tensor, strength: float) -> torch.Tensor:
    return torch.addmm(grad, grad @ V, V.T, alpha=-strength)


def _scale_grad(grad: torch.Tensor, factor: float) -> torch.Tensor:
    return grad * factor


def subspace_leak(delta: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[float, float]:
    """``(‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖)`` in fp32 (Frobenius norms); ``(0, 0)`` for ``ΔW = 0``."""
    d, u, v = delta.float(), U.float(), V.float()
    norm = torch.linalg.norm(d)
    if norm == 0:
        return 0.0, 0.0
    return float(torch.linalg.norm(u.T @ d) / norm), float(torch.linalg.norm(d @ v) / norm)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the same space as ``x``'s (thin QR in fp32; no bf16 QR kernels exist)."""
    work = x if x.dtype == torch.float64 else x.float()
    return torch.linalg.qr(work, mode="reduced").Q


# --------------------------------------------------------------------------- model inspection


#: A PEFT ``LoraLayer``.  Typed ``Any``: its ``lora_A``/``lora_B`` are ``ModuleDict`` attributes, which
#: torch's stubs type as ``Tensor | Module`` on an ``nn.Module``, so every use would need a cast.
LoraModule = Any


def lora_modules(model: nn.Module) -> list[tuple[str, LoraModule]]:
    """Every PEFT LoRA layer of ``model`` as ``(module name, module)``, in model order.

    Raises :class:`BadInputError` when there is none: the hooks need a model
    wrapped by ``peft.get_peft_model`` (or ``PeftModel.from_pretrained``).
    """
    from peft.tuners.lora import LoraLayer

    found = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    if not found:
        raise BadInputError(
            f"{type(model).__name__} has no LoRA layers; wrap it with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    return found


def _unsupported(module: LoraModule, adapters: Sequence[str]) -> str | None:
    """Why the projector cannot keep this LoRA layer's ΔW out of a subspace, or ``None`` if it can."""
    if not adapters:
        return "no active adapter with lora_A/lora_B on this module"
    if any(not isinstance(module.lora_A[a], nn.Linear) for a in adapters):
        return f"{type(module).__name__} is not a Linear LoRA layer (conv LoRA is not supported)"
    variants = getattr(module, "lora_variant", {})
    for a in adapters:
        if a in variants:
            return (
                f"the {_variant_name(module, variants[a])} LoRA variant does not update W by B·A alone; not supported"
            )
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D) layers store W transposed; not supported"
    return None


#: LoRA variants by what enables them in a ``LoraConfig``: a field PEFT tags ``is_lora_variant``, or
#: (``mica``) a value of ``init_lora_weights``.  PEFT applies each through a ``LoraVariant`` whose
#: forward pass is not ΔW = B·A, so neither the projector nor a per-layer blend can handle it.
LORA_VARIANTS: dict[str, str] = {
    "use_dora": "DoRA",
    "kasa_config": "KaSA",
    "alora_invocation_tokens": "aLoRA",
    "velora_config": "VeLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow",
    "monteclora_config": "MonteCLoRA",
    "mica": "MiCA",
}


#: ``init_lora_weights`` values of :data:`LORA_VARIANTS` (PEFT lists them in that field's
#: ``metadata["lora_variants"]``); every other key of the table is a config field.
_VARIANT_INITS = frozenset({"mica"})
_VARIANT_FIELDS = frozenset(LORA_VARIANTS) - _VARIANT_INITS

#: The fields a ``LoraConfig`` (and its ``PeftConfig`` base) writes to ``adapter_config.json`` that
#: enable no variant.  A truthy field outside these and :data:`LORA_VARIANTS` makes
#: :func:`lora_variant_of_config` ask the installed PEFT, so plain LoRA never imports it.
_PLAIN_LORA_FIELDS = frozenset(
    {
        "alpha_pattern",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_qalora",
        "use_rslora",
    }
)
#: ``init_lora_weights`` strings that initialise plain LoRA (besides ``pissa_niter_<n>``).
_PLAIN_INITS = frozenset({"gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "lora_ga"})


@functools.cache
def _peft_variants() -> tuple[frozenset[str], frozenset[str]]:
    """The installed PEFT's variant fields (tagged ``is_lora_variant``) and variant init values, or empty sets."""
    try:
        from peft import LoraConfig
    except ImportError:
        return frozenset(), frozenset()
    tagged = {f.name: f for f in fields(LoraConfig)}
    init = tagged.get("init_lora_weights")
    inits = frozenset(init.metadata.get("lora_variants", ())) if init is not None else frozenset()
    return frozenset(n for n, f in tagged.items() if f.metadata.get("is_lora_variant")), inits


def lora_variant_of_config(config: Mapping[str, Any]) -> str | None:
    """The LoRA variant a saved adapter config (``adapter_config.json``) enables, or ``None`` for plain LoRA.

    Decided from :data:`LORA_VARIANTS` and the known plain-LoRA fields alone where they
    explain the config; only a truthy field (or ``init_lora_weights`` string) they do not
    know makes it ask the installed PEFT's ``LoraConfig``, whose fields tagged as variants
    (and init values listed as variants) count too, so variants newer than this table are
    refused as well.

    Args:
        config: the adapter config as a mapping.

    Returns:
        The variant's name (``"DoRA"``, ``"KaSA"``, ... or the field's name), or ``None``.
    """
    init = config.get("init_lora_weights")
    init = init if isinstance(init, str) else None
    for key, name in LORA_VARIANTS.items():
        enabled = init == key if key in _VARIANT_INITS else config.get(key)
        if enabled:
            return name
    unknown = [k for k, v in config.items() if v and k not in _PLAIN_LORA_FIELDS and k not in _VARIANT_FIELDS]
    if init is not None and (init in _PLAIN_INITS or init.startswith("pissa_niter_")):
        init = None
    if not unknown and init is None:
        return None
    variant_fields, variant_inits = _peft_variants()
    for key in unknown:
        if key in variant_fields:
            return key
    return init if init in variant_inits else None


def _variant_name(module: LoraModule, variant: object) -> str:
    """The name of the variant a LoRA layer applies to an adapter, from the layer's own variant table."""
    for keys, cls in getattr(module, "lora_variants", {}).items():
        if cls is not None and type(variant) is cls:
            return "+".join(LORA_VARIANTS.get(k, k) for k in keys)
    return type(variant).__name__


def _module_adapters(module: LoraModule, wanted: Sequence[str] | None) -> tuple[str, ...]:
    names = wanted if wanted is not None else module.active_adapters
    return tuple(a for a in names if a in module.lora_A)


# --------------------------------------------------------------------------- reports


@dataclass
class Coverage:
    """Which LoRA modules a hook covers, and why each other one is not covered.

    Keys are module names as ``model.named_modules()`` gives them.
    """

    #: module → what it got (the Fisher tensor name, or the layer factor).
    covered: dict[str, str] = field(default_factory=dict)
    #: module → why it got nothing although it was selected (no mask, no importance, unsupported layer).
    missing: dict[str, str] = field(default_factory=dict)
    #: module → why it was not selected (kinds / layers options).
    excluded: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: how many modules are covered, missing and excluded."""
        return f"{len(self.covered)} covered, {len(self.missing)} missing, {len(self.excluded)} excluded"

    def log_missing(self, what: str) -> None:
        """Warn once about the missing modules (the first few named), list all at DEBUG."""
        if not self.missing:
            return
        items = list(self.missing.items())
        shown = "; ".join(f"{m}: {why}" for m, why in items[:3])
        more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
        log.warning("%s: %d LoRA module(s) not covered: %s%s", what, len(items), shown, more)
        for module, why in items:
            log.debug("%s: not covered: %s: %s", what, module, why)


# --------------------------------------------------------------------------- projector


@dataclass(frozen=True)
class ProjectorConfig:
    """Options of :class:`SubspaceProjector`, validated when built."""

    #: ``"param"``: project B and A after each optimizer step (exact for any optimizer);
    #: ``"grad"``: project their gradients during backward (exact for SGD only).
    mode: str = "param"
    #: Number of leading modes to use, ``<=`` the store's k; ``None`` uses all k.
    rank: int | None = None
    #: Fraction of the in-subspace component removed each time, in [0, 1].
    strength: float = 1.0
    #: Projection kinds to cover (subset of q, k, v, o, gate, up, down, other); ``None`` = all.
    #: A comma-separated string is accepted.
    kinds: tuple[str, ...] | None = None
    #: Decoder-layer indices to cover; ``None`` = all (modules outside the layers are kept).
    layers: tuple[int, ...] | None = None
    #: Adapter names to cover; ``None`` = each module's active adapters.
    adapters: tuple[str, ...] | None = None
    #: Raise instead of only reporting when a selected module has no usable mask.
    strict: bool = False
    #: Check each mask's CRC-32C as it is loaded from a mask store path (a corrupt mask raises
    #: ChecksumMismatchError instead of steering training); costs one CRC pass over U, S and V.
    verify: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise BadInputError(f"mode {self.mode!r} is not one of {MODES}", param="mode")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise BadInputError(f"rank must be a positive integer, got {self.rank!r}", param="rank")
        if not (isinstance(self.strength, (int, float)) and 0.0 <= self.strength <= 1.0):
            raise BadInputError(f"strength must be a number in [0, 1], got {self.strength!r}", param="strength")
        if self.kinds is not None:
            kinds = self.kinds.split(",") if isinstance(self.kinds, str) else self.kinds
            kinds = tuple(k.strip() for k in kinds)
            bad = [k for k in kinds if k not in (*KINDS, "other")]
            if bad or not kinds:
                raise BadInputError(f"kinds {self.kinds!r}: {bad or 'empty'} not in {(*KINDS, 'other')}", param="kinds")
            object.__setattr__(self, "kinds", kinds)
        if self.layers is not None:
            layers = tuple(self.layers)
            if any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in layers):
                raise BadInputError(f"layers must be non-negative integers, got {self.layers!r}", param="layers")
            object.__setattr__(self, "layers", layers)
        if self.adapters is not None:
            object.__setattr__(
                self, "adapters", (self.adapters,) if isinstance(self.adapters, str) else tuple(self.adapters)
            )
        if not isinstance(self.verify, bool):
            raise BadInputError(f"verify must be True or False, got {self.verify!r}", param="verify")

    def selects(self, layer: int | None, kind: str) -> str | None:
        """Why a module of this layer and kind is not selected, or ``None`` when it is."""
        if self.kinds is not None and kind not in self.kinds:
            return f"kind {kind!r} not in kinds {','.join(self.kinds)}"
        if self.layers is not None and layer is not None and layer not in self.layers:
            return f"layer {layer} not in layers {list(self.layers)}"
        return None


@dataclass
class _Target:
    """One covered LoRA layer: where its mask comes from and, once loaded, the mask."""

    name: str
    fisher: str
    module: LoraModule
    adapters: tuple[str, ...]
    by_layer_kind: bool
    U: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # set by SubspaceProjector._load
    V: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _open_masks(masks: str | os.PathLike[str] | MaskSource, verify: bool) -> MaskSource:
    if isinstance(masks, (str, os.PathLike)):
        from .masks import open_masks

        return open_masks(Path(masks), verify=verify)
    return masks


def _layer_kind_index(names: Iterable[str]) -> dict[tuple[int | None, str], list[str]]:
    index: dict[tuple[int | None, str], list[str]] = {}
    for name in names:
        index.setdefault(parse_name(name), []).append(name)
    return index


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split("."))):
        if x != y:
            break
        n += 1
    return n


class SubspaceProjector:
    """Keeps every covered LoRA layer's ΔW out of its Fisher top-k subspace (see the module docstring).

    Building it attaches it: names are resolved, each covered module's
    ``U``, ``V`` are read from the mask store onto the module's device and
    dtype, ``B`` and ``A`` are projected once, and in ``grad`` mode the
    gradient hooks are registered.  In ``param`` mode call :meth:`project_`
    after every optimizer step (:func:`attach_training` and
    :class:`FisherTrainerCallback` do that for you).

    A LoRA module name maps to a Fisher tensor name by
    :func:`fisherstore.naming.canonical_name`; when the store has no tensor of
    that exact name (a multimodal ``language_model.`` path against a
    text-only store, say) it matches the store tensor of the same
    ``(layer, kind)``, preferring the longest common name suffix.  Selected
    modules without a usable mask end up in ``coverage.missing`` and are
    logged — or raise with ``strict=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: str | os.PathLike[str] | MaskSource,
        config: ProjectorConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise BadInputError(f"give either a ProjectorConfig or options {sorted(options)}, not both")
        self.config = config or ProjectorConfig(**options)
        store = _open_masks(masks, self.config.verify)
        stored = int(store.rank)
        if self.config.rank is not None and self.config.rank > stored:
            raise BadInputError(f"rank {self.config.rank} exceeds the mask store's rank k={stored}", param="rank")
        #: Modes used per tensor (a tensor smaller than k holds min(k, m, n) modes; all of them are used).
        self.rank = self.config.rank or stored
        self.coverage = Coverage()
        self._handles: list[RemovableHandle] = []
        try:
            self._targets = [t for t in self._resolve(model, store) if self._load(t, store)]
        finally:
            if store is not masks:  # opened here from a path: every mask is loaded now
                store.close()
        if self.config.strict and self.coverage.missing:
            module, why = next(iter(self.coverage.missing.items()))
            raise BadInputError(
                f"{len(self.coverage.missing)} LoRA module(s) have no usable mask (first: {module}: {why}); "
                "give a mask store made for this model, or narrow kinds/layers"
            )
        self.coverage.log_missing("subspace projector")
        self.project_()
        if self.config.mode == "grad":
            self._register_grad_hooks()
        log.info(
            "subspace projector (%s mode, rank %d, strength %g): %s",
            self.config.mode,
            self.rank,
            self.config.strength,
            self.coverage.summary(),
        )

    # -- attach

    def _resolve(self, model: nn.Module, store: MaskSource) -> list[_Target]:
        names = set(store.names)
        index = _layer_kind_index(names)
        targets = []
        for name, module in lora_modules(model):
            fisher = canonical_name(name)
            layer, kind = parse_name(fisher)
            why = self.config.selects(layer, kind)
            if why:
                self.coverage.excluded[name] = why
                continue
            adapters = _module_adapters(module, self.config.adapters)
            why = _unsupported(module, adapters)
            if why:
                self.coverage.missing[name] = why
                continue
            by_layer_kind = fisher not in names
            if by_layer_kind:
                candidates = index.get((layer, kind), []) if layer is not None else []
                if not candidates:
                    self.coverage.missing[name] = f"no mask named {fisher!r} nor any for layer {layer} kind {kind!r}"
                    continue
                ranked = sorted(candidates, key=lambda c: -_common_suffix(c, fisher))
                if len(ranked) > 1 and _common_suffix(ranked[0], fisher) == _common_suffix(ranked[1], fisher):
                    self.coverage.missing[name] = f"ambiguous: masks {ranked} all match layer {layer} kind {kind!r}"
                    continue
                fisher = ranked[0]
            targets.append(_Target(name, fisher, module, adapters, by_layer_kind))
        return targets

    def _load(self, target: _Target, store: MaskSource) -> bool:
        """Read ``target``'s mask onto its module's device and dtype; ``False`` (and reported) if unusable."""
        module = target.module
        ref = module.lora_B[target.adapters[0]].weight
        U, _, V = store.get(target.fisher, rank=self.config.rank, device=ref.device, dtype=torch.float32)
        expected = (module.out_features, module.in_features)
        if (U.shape[0], V.shape[0]) != expected or U.shape[1] != V.shape[1]:
            why = (
                f"mask {target.fisher!r} has U {tuple(U.shape)}, V {tuple(V.shape)} but the layer's "
                f"weight is {expected[0]}x{expected[1]}"
            )
            if not target.by_layer_kind:
                raise BadInputError(f"{target.name}: {why}; the mask store was made for another model")
            self.coverage.missing[target.name] = why
            return False
        target.U = _orthonormal(U).to(ref.dtype)
        target.V = _orthonormal(V).to(ref.dtype)
        how = " (matched by layer and kind)" if target.by_layer_kind else ""
        self.coverage.covered[target.name] = target.fisher + how
        return True

    def _register_grad_hooks(self) -> None:
        s = self.config.strength
        for t in self._targets:
            for a in t.adapters:
                B, A = t.module.lora_B[a].weight, t.module.lora_A[a].weight
                self._handles.append(B.register_hook(functools.partial(_left_grad, U=t.U, strength=s)))
                self._handles.append(A.register_hook(functools.partial(_right_grad, V=t.V, strength=s)))

    # -- use

    def project_(self) -> None:
        """Project every covered ``B`` and ``A`` now (after each optimizer step in ``param`` mode)."""
        for t in self._targets:
            for a in t.adapters:
                project_lora_(t.module.lora_B[a].weight, t.module.lora_A[a].weight, t.U, t.V, self.config.strength)

    def leak(self) -> dict[tuple[str, str], tuple[float, float]]:
        """``(module, adapter) → (‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖)`` for every covered module, now."""
        out = {}
        with torch.no_grad():
            for t in self._targets:
                for a in t.adapters:
                    delta = t.module.lora_B[a].weight @ t.module.lora_A[a].weight
                    out[(t.name, a)] = subspace_leak(delta, t.U, t.V)
        return out

    @property
    def mask_bytes(self) -> int:
        """Bytes held by the loaded masks: Σ (out + in)·r·element size."""
        return sum((t.U.numel() + t.V.numel()) * t.U.element_size() for t in self._targets)

    def detach(self) -> None:
        """Remove the gradient hooks (``grad`` mode); :meth:`project_` still works afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- layer scaler


@dataclass(frozen=True)
class ScaleRule:
    """How layer importance becomes a per-layer factor::

        factor_l = clip((I_l / ref) ** -power, min_factor, max_factor)

    ``ref`` summarises the importances (``reference``: geometric mean of the
    positive values by default, so a typical layer gets ≈1 and multiplying all
    importances by a constant changes nothing).  ``power > 0`` damps the
    layers the Fisher marks as important (their updates would disturb the
    instruct behaviour most) and boosts the others; ``power < 0`` does the
    opposite; ``power = 0`` gives 1 everywhere.  Clipping bounds the effect of
    layers whose Fisher is near zero or enormous (real per-layer sums span
    decades).  A layer of importance 0 gets ``max_factor`` for ``power > 0``.
    """

    power: float = 0.5
    reference: str = "geomean"
    min_factor: float = 0.1
    max_factor: float = 10.0

    def __post_init__(self) -> None:
        if not (isinstance(self.power, (int, float)) and math.isfinite(self.power)):
            raise BadInputError(f"power must be a finite number, got {self.power!r}", param="power")
        if self.reference not in REFERENCES:
            raise BadInputError(f"reference {self.reference!r} is not one of {REFERENCES}", param="reference")
        lo, hi = self.min_factor, self.max_factor
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and math.isfinite(hi) and 0 <= lo <= hi):
            raise BadInputError(
                f"scale clip range must satisfy 0 <= min_factor <= max_factor < inf, got [{lo!r}, {hi!r}]"
            )

    def reference_value(self, importance: Mapping[int, float]) -> float:
        """The value importances are divided by: ``reference`` over the layers of positive importance."""
        positive = [float(v) for v in importance.values() if v > 0]
        if not positive:
            raise BadInputError("layer importance has no positive value; cannot derive layer factors from it")
        if self.reference == "geomean":
            return math.exp(math.fsum(math.log(v) for v in positive) / len(positive))
        if self.reference == "mean":
            return math.fsum(positive) / len(positive)
        if self.reference == "median":
            return statistics.median(positive)
        return max(positive)

    def unclipped(self, relative: float) -> float:
        """``relative ** -power`` before clipping (``inf`` for a zero importance when ``power > 0``)."""
        if relative == 0:
            return math.inf if self.power > 0 else (0.0 if self.power < 0 else 1.0)
        return relative**-self.power

    def factors(self, importance: Mapping[int, float]) -> dict[int, float]:
        """Layer → factor for every layer of ``importance``."""
        ref = self.reference_value(importance)
        return {
            int(layer): min(max(self.unclipped(float(value) / ref), self.min_factor), self.max_factor)
            for layer, value in sorted(importance.items())
        }

    def describe(self) -> str:
        """The formula with this rule's numbers, for tables and logs."""
        bounds = f"{self.min_factor:g}, {self.max_factor:g}"
        return f"factor = clip((importance / {self.reference}) ** -{self.power:g}, {bounds})"

    def to_dict(self) -> dict[str, Any]:
        """The rule's fields, for provenance records."""
        return asdict(self)


def format_factor_table(importance: Mapping[int, float], rule: ScaleRule | None = None, alpha: float = 1.0) -> str:
    """A text table: layer, importance, importance / reference, factor (``*`` = clipped).

    Args:
        importance: ``{layer: importance}``.
        rule: how importance becomes a factor (default :class:`ScaleRule`).
        alpha: the global strength multiplying every factor.

    Returns:
        The table, one line per layer.
    """
    rule = rule or ScaleRule()
    ref = rule.reference_value(importance)
    factors = rule.factors(importance)
    lines = [f"{'layer':>5}  {'importance':>12}  {'relative':>10}  {'factor':>8}"]
    for layer, value in sorted(importance.items()):
        rel = value / ref
        mark = " " if rule.unclipped(rel) == factors[layer] else "*"
        lines.append(f"{layer:>5}  {value:>12.5g}  {rel:>10.4g}  {factors[layer] * alpha:>8.4g}{mark}")
    note = f" × alpha {alpha:g}" if alpha != 1.0 else ""
    lines.append(f"{rule.describe()}{note}; {rule.reference} = {ref:.5g}; * = clipped")
    return "\n".join(lines)


class LayerScaler:
    """Multiplies every LoRA gradient of decoder layer ``l`` by ``factors[l]``.

    ``importance`` is anything :func:`fisherstore.importance.load_importance`
    takes (a store, a ``layer_importance.json``, a ``{layer: value}`` mapping
    or a list); ``rule`` maps it to factors.  Building it attaches tensor
    hooks to each LoRA parameter (``lora_A``, ``lora_B``, DoRA magnitudes...)
    of the covered layers; LoRA modules outside the decoder layers, or in a
    layer the importance does not list, are reported in ``coverage.missing``
    and left unscaled.
    """

    def __init__(self, model: nn.Module, importance: Any, rule: ScaleRule | None = None) -> None:
        self.rule = rule or ScaleRule()
        self.importance = load_importance(importance)
        self.factors = self.rule.factors(self.importance)
        self.coverage = Coverage()
        self._handles: list[RemovableHandle] = []
        for name, module in lora_modules(model):
            layer = parse_name(name)[0]
            if layer is None:
                self.coverage.missing[name] = "outside the decoder layers: no layer importance applies"
                continue
            if layer not in self.factors:
                self.coverage.missing[name] = f"layer {layer} has no importance value"
                continue
            factor = self.factors[layer]
            params = [p for n, p in module.named_parameters() if n.startswith("lora_") and p.requires_grad]
            if factor != 1.0:
                hook = functools.partial(_scale_grad, factor=factor)
                self._handles.extend(p.register_hook(hook) for p in params)
            self.coverage.covered[name] = f"layer {layer} x {factor:.6g} ({len(params)} parameters)"
        self.coverage.log_missing("layer scaler")
        log.info("layer scaler (%s): %s", self.rule.describe(), self.coverage.summary())

    def table(self) -> str:
        """The importance → factor table (see :func:`format_factor_table`)."""
        return format_factor_table(self.importance, self.rule)

    def detach(self) -> None:
        """Remove the gradient hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------- wiring


@dataclass
class TrainingHooks:
    """The projector and scaler attached to one model, and the optimizer hook that drives them."""

    projector: SubspaceProjector | None = None
    scaler: LayerScaler | None = None
    _step_hook: RemovableHandle | None = None

    def after_step(self) -> None:
        """Call after every optimizer step (done for you when an optimizer was given): ``param``-mode projection."""
        if self.projector is not None and self.projector.config.mode == "param":
            self.projector.project_()

    def detach(self) -> None:
        """Remove every hook this object registered."""
        if self.projector is not None:
            self.projector.detach()
        if self.scaler is not None:
            self.scaler.detach()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None


def attach_training(
    model: nn.Module,
    *,
    masks: str | os.PathLike[str] | MaskSource | None = None,
    importance: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    rule: ScaleRule | None = None,
    **projector_options: Any,
) -> TrainingHooks:
    """Attach a subspace projector (if ``masks``) and a layer scaler (if ``importance``) to a PEFT model.

    With ``optimizer`` (a ``torch.optim.Optimizer``), ``param``-mode
    projection runs in the optimizer's step post-hook, so a plain loop needs
    nothing else; without it call :meth:`TrainingHooks.after_step` after each
    step.  ``projector_options`` are :class:`ProjectorConfig` fields.

    Args:
        model: a PEFT model with LoRA layers.
        masks: a mask store (path or :class:`MaskSource`) for the subspace projector.
        importance: per-layer importance for the scaler (anything :func:`~fisherstore.importance.load_importance`
            takes).
        optimizer: the optimizer whose steps the param-mode projection follows.
        rule: how importance becomes a per-layer factor (default :class:`ScaleRule`).
        **projector_options: :class:`ProjectorConfig` fields.

    Returns:
        The attached hooks; :meth:`TrainingHooks.detach` removes them.
    """
    if masks is None and importance is None:
        raise BadInputError("attach_training needs masks (a mask store) and/or importance (layer importance)")
    hooks = TrainingHooks()
    if masks is not None:
        hooks.projector = SubspaceProjector(model, masks, **projector_options)
    elif projector_options:
        raise BadInputError(f"projector options {sorted(projector_options)} given without masks")
    if importance is not None:
        hooks.scaler = LayerScaler(model, importance, rule)
    if optimizer is not None and hooks.projector is not None and hooks.projector.config.mode == "param":
        hooks._step_hook = optimizer.register_step_post_hook(lambda *_: hooks.after_step())
    return hooks


@functools.cache
def _callback_class() -> type:
    """Build the TrainerCallback subclass on first use, so importing fisherstore does not import transformers."""
    from transformers import TrainerCallback

    class FisherTrainerCallback(TrainerCallback):
        """HF ``Trainer`` / TRL ``SFTTrainer`` callback wiring :func:`attach_training`.

        ``FisherTrainerCallback(masks=..., importance=..., rule=..., mode=..., rank=...,
        strength=..., kinds=..., layers=...)``.  Hooks attach at ``on_train_begin``
        (projecting B and A once), ``param``-mode projection runs at every
        ``on_optimizer_step`` (after the optimizer, before gradients are zeroed),
        and the hooks are removed at ``on_train_end``.  Options are validated
        when the callback is built, before any training.
        """

        def __init__(
            self, masks: Any = None, importance: Any = None, rule: ScaleRule | None = None, **projector_options: Any
        ) -> None:
            if masks is None and importance is None:
                raise BadInputError("FisherTrainerCallback needs masks and/or importance")
            if masks is None and projector_options:
                raise BadInputError(f"projector options {sorted(projector_options)} given without masks")
            self.config = ProjectorConfig(**projector_options)
            self.masks, self.importance, self.rule = masks, importance, rule
            self.hooks: TrainingHooks | None = None

        def on_train_begin(
            self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
        ) -> None:
            if self.hooks is None:
                if model is None:
                    raise BadInputError("FisherTrainerCallback got no model from the Trainer")
                options: dict[str, Any] = {"config": self.config} if self.masks is not None else {}
                self.hooks = attach_training(
                    model, masks=self.masks, importance=self.importance, rule=self.rule, **options
                )

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.hooks is not None:
                self.hooks.after_step()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.hooks is not None:
                self.hooks.detach()
                self.hooks = None

    FisherTrainerCallback.__module__ = __name__
    return FisherTrainerCallback


def __getattr__(name: str) -> Any:
    if name == "FisherTrainerCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
