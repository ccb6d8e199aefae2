"""Layer-grouped estimation of the diagonal Fisher information of a causal LM.

For each group of G consecutive decoder layers (see :func:`~fisherstore.writer.plan_groups`):

1. only that group's target weights require grad, so autograd records nothing
   below the lowest of them and computes no weight gradient outside the group;
2. each prompt is run alone (batch-1 semantics) and its loss — the mean
   next-token cross-entropy over the whole templated sequence — is
   back-propagated;
3. as soon as a weight's gradient is accumulated, a post-accumulate-grad hook
   adds ``grad.float()**2`` to that weight's fp32 accumulator on the weight's
   device and frees the gradient, so peak memory is the model, one prompt's
   activations and one group's fp32 accumulators;
4. after all prompts the accumulators are divided by the prompt count,
   downcast to the storage dtype, moved to the CPU and handed to the store's
   background writer, and the next group starts while that group is written.

Accumulating in fp32 matters: per-prompt squared gradients span ~20 decades,
and summing hundreds of them in bf16 would lose the small ones entirely.

That is the ``naive`` schedule, one forward and backward per group.  The
default ``pipelined`` schedule computes the same per-prompt gradients with one
full pass: the top group is done in pass 1, which also records (detached) the
hidden state entering each lower group and every lower layer's arguments; each
lower group, top-down, then re-runs only its own layers from its recorded input
and back-propagates the gradient recorded at the input of the group above.
Models whose layers read more than the layer below (Gemma-4 k/v sharing),
targets outside the decoder layers, or layers that are not one ModuleList fall
back to ``naive``, with a log line saying why.

Two estimators: ``empirical`` uses the prompt's own next tokens as labels;
``sampled`` draws each label from the model's predictive distribution (the
true Fisher's expectation, one sample per position), seeded per prompt so that
every group — and a resumed run — sees the same labels.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import logging
import resource
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

from ._dist import Ranks, default_backend
from .digests import sha256_of
from .dtypes import canonical_dtype
from .errors import BadInputError, FisherStoreError, check_int
from .manifest import GroupInfo, TensorSpec, dtype_name
from .models import config_hash
from .naming import parse_name, target_regex
from .planning import ExtractPlan, ModelShape, plan_extraction, recorded_plan
from .progress import progress
from .prompts import PromptSet, as_prompt_set, encode_prompts
from .sizes import parse_bytes
from .storage import Remote, resolve
from .writer import StoreWriter, plan_groups

__all__ = [
    "ESTIMATORS",
    "SCHEDULES",
    "STORAGE_DTYPES",
    "ExtractConfig",
    "ExtractSummary",
    "extract",
    "parse_bytes",
    "parse_group_size",
    "storage_dtype",
    "target_parameters",
]

log = logging.getLogger(__name__)

#: Fisher estimators: labels from the data, or sampled from the model.
ESTIMATORS = ("empirical", "sampled")

#: Schedules: groups top-down from recorded boundary states (pipelined), or a whole pass per group (naive).
SCHEDULES = ("pipelined", "naive")

#: Storage dtypes, by canonical name.  fp16 is refused: Fisher values span ~20 decades
#: (2e-20 .. 3 on SmolLM2) and ~8% of them flush to zero in fp16, whose range ends at 6e-8.
STORAGE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# Provenance fields that must agree for a run to resume another one's store.
_RESUME_KEYS = (
    "config_hash",
    "prompts_sha256",
    "num_prompts",
    "max_length",
    "chat_template",
    "estimator",
    "seed",
    "targets",
    "tokenizer_vocab_size",
    "tokens",
)


@dataclass(frozen=True)
class ExtractConfig:
    """What :func:`extract` estimates and how it stores it.

    Every field is validated on construction (the error names the field and
    quotes the value); aliases are read once here, so ``dtype`` is canonical
    (``"bfloat16"`` or ``"float32"``) and ``group_size`` is ``"auto"`` or an
    int.  :meth:`help` gives each field's help line, which the CLI shows for
    the matching option.
    """

    group_size: int | str = field(
        default="auto",
        metadata={
            "help": "decoder layers per group, or auto (default): the largest group whose fp32 accumulators, one "
            "gradient, boundary tensors and one prompt's activations fit the memory budget (a resumed run keeps "
            "the group size recorded in the store)"
        },
    )
    targets: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "weights to estimate: a regex, or kinds like q,k,v "
            "(default: q/k/v/o/gate/up/down in decoder layers)"
        },
    )
    backend: str = field(
        default="safetensors",
        metadata={"help": "container format (default safetensors)"},
    )
    backend_options: Mapping[str, Any] | None = field(
        default=None,
        metadata={"help": "options of the backend, e.g. zarr compression"},
    )
    dtype: str = field(
        default="bfloat16",
        metadata={"help": "storage dtype (default bfloat16; fp16 is refused: Fisher values span ~20 decades)"},
    )
    estimator: str = field(
        default="empirical",
        metadata={
            "help": "labels: the prompt's own next tokens (empirical, default) or samples from the model (sampled)"
        },
    )
    max_length: int = field(
        default=256,
        metadata={"help": "truncate each templated prompt to this many tokens (default 256)"},
    )
    chat_template: bool = field(
        default=True,
        metadata={
            "help": "apply the tokenizer's chat template "
            "(turn it off to tokenize prompts as raw text, required when the tokenizer has none)"
        },
    )
    max_memory: int | str | None = field(
        default=None,
        metadata={
            "help": "memory budget of group size auto, e.g. 40GiB (default: the device's free memory, or the "
            "CPU's available memory, less a margin of a tenth, at least 512 MiB); "
            "K/M/G and KiB/MiB/GiB are binary, KB/MB/GB decimal"
        },
    )
    resume: bool = field(
        default=False,
        metadata={"help": "continue an interrupted store: skip the groups its manifest marks complete"},
    )
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace an existing store at the output path"},
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the sampled estimator's labels (default 0)"},
    )
    schedule: str = field(
        default="pipelined",
        metadata={
            "help": "pipelined (default): one full pass per prompt, then each group re-runs only its own layers "
            "from recorded boundary states; naive: a whole forward and backward per group (also the fallback "
            "for models with cross-layer KV sharing)"
        },
    )

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise BadInputError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}", param="schedule")
        if self.estimator not in ESTIMATORS:
            raise BadInputError(
                f"estimator {self.estimator!r} is not one of {', '.join(ESTIMATORS)}", param="estimator"
            )
        object.__setattr__(self, "dtype", _storage_dtype_name(self.dtype))
        if self.group_size != "auto":
            object.__setattr__(self, "group_size", parse_group_size(self.group_size))
        if self.max_memory is not None:
            _max_memory_bytes(self.max_memory)
        if isinstance(self.max_length, int) and not isinstance(self.max_length, bool) and self.max_length == 1:
            # one token has no next token to predict: the loss would be the mean of nothing
            raise BadInputError(
                "max_length must be an integer >= 2 (a prompt needs a next token to predict), got 1",
                param="max_length",
            )
        check_int("max_length", self.max_length, 2)
        check_int("seed", self.seed, 0)

    @classmethod
    def help(cls, name: str) -> str:
        """The help line of field ``name``."""
        return str(_config_field(name).metadata["help"])

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name``."""
        return _config_field(name).default


def _config_field(name: str) -> Field[Any]:
    return next(f for f in fields(ExtractConfig) if f.name == name)


@dataclass(frozen=True)
class ExtractSummary:
    """What an extraction did and what it cost."""

    store: str
    estimator: str
    schedule: str
    group_size: int
    groups_total: int
    groups_run: int
    num_prompts: int
    tokens_per_pass: int
    tokens_processed: int
    seconds: float
    tokens_per_second: float
    group_seconds: tuple[float, ...]
    writer_blocked_seconds: float
    peak_rss_bytes: int
    peak_device_bytes: int | None
    boundary_bytes: int
    #: The group size, the budget it was chosen under and the estimate by item (:mod:`fisherstore.planning`).
    plan: ExtractPlan | None = None
    #: How many torchrun ranks shared the prompts, and this process's rank (0 wrote the store).
    world_size: int = 1
    rank: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (what benchmarks record)."""
        d = asdict(self)
        d["group_seconds"] = list(self.group_seconds)
        return d


def target_parameters(model: torch.nn.Module, targets: str | list[str] | None = None) -> dict[str, torch.nn.Parameter]:
    """The model's parameters whose names match ``targets`` (:func:`~fisherstore.naming.target_regex`), in order."""
    pattern = target_regex(targets)
    params = {n: p for n, p in model.named_parameters() if pattern.search(n)}
    if not params:
        some = [n for n, _ in model.named_parameters()][:6]
        raise BadInputError(
            f"targets {pattern.pattern!r} matches no parameter of the model (names look like {some})", param="targets"
        )
    return params


def _extract_plan(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    specs: Sequence[TensorSpec],
    tokens: Sequence[int],
    cfg: ExtractConfig,
    schedule: str,
    out: Path | Remote,
) -> ExtractPlan:
    """The group size and boundary placement of this run (:mod:`fisherstore.planning`).

    A resumed run with ``group_size="auto"`` takes the plan recorded in its
    store, whatever the budget now, so that it plans the same groups.
    """
    if cfg.resume and cfg.group_size == "auto":
        recorded = recorded_plan(out)
        if recorded is not None:
            return recorded
    if cfg.group_size != "auto" and cfg.max_memory is not None:
        log.warning(
            "group size %s is given: the memory budget %s only decides where boundary tensors are kept",
            cfg.group_size,
            cfg.max_memory,
        )
    return plan_extraction(
        specs,
        ModelShape.of(model),
        tokens,
        schedule=schedule,
        devices=sorted({p.device for p in params.values()}, key=str),
        group_size=cfg.group_size,
        max_memory=cfg.max_memory,
    )


def _agreed_plan(
    ranks: Ranks,
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    specs: Sequence[TensorSpec],
    tokens: Sequence[int],
    cfg: ExtractConfig,
    schedule: str,
    out: Path | Remote,
) -> ExtractPlan:
    """Rank 0's plan (:func:`_extract_plan`), on every rank.

    Free memory differs between ranks, so plans made on each rank could
    differ; the groups must be the same everywhere (their accumulators are
    all-reduced group by group), so rank 0 alone plans and broadcasts its
    group size and boundary placement.  A failure to plan on rank 0 is
    raised on every rank.
    """
    mine: ExtractPlan | None = None
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            mine = _extract_plan(model, params, specs, tokens, cfg, schedule, out)
        except Exception as exc:
            failure = exc
    ranks.settle(failure, "extract")
    agreed = ranks.broadcast(mine)
    if not isinstance(agreed, ExtractPlan):  # settle raised if rank 0 failed
        raise FisherStoreError(f"rank 0 sent no extraction plan (got {type(agreed).__name__})")
    return agreed


def _max_memory_bytes(value: int | str) -> int:
    try:
        return parse_bytes(value)
    except BadInputError as exc:
        raise BadInputError(f"max_memory: {exc}", param="max_memory") from None


def extract(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: PromptSet | Sequence[str | Sequence[dict[str, str]]],
    out: str | Path,
    config: ExtractConfig | None = None,
    *,
    provenance: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ExtractSummary:
    """Estimate the diagonal Fisher of ``model``'s target weights over ``prompts`` into a store at ``out``.

    With ``config.resume`` the groups the store's manifest marks complete are
    skipped; the run must use the same model, prompts and options (checked),
    and gives the same store as an uninterrupted run.  The model stays where
    it is (one device or an accelerate device map) and is left with
    ``requires_grad=False`` everywhere.

    Args:
        model: a causal LM (e.g. :attr:`fisherstore.models.LoadedModel.model`).
        tokenizer: its tokenizer.
        prompts: a :class:`~fisherstore.prompts.PromptSet`, or prompts as strings or chat message lists.
        out: the store directory to write, or its URL (``s3://bucket/store``: objects stream up group by group).
        config: what to estimate and how to store it (default: ``ExtractConfig()``).
        provenance: merged into the manifest's provenance (e.g.
            :attr:`fisherstore.models.LoadedModel.provenance`).
        storage_options: keyword arguments of the filesystem of ``out`` when it is an URL.

    Returns:
        What the run did and what it cost.
    """
    cfg = ExtractConfig() if config is None else config
    target = resolve(out, storage_options, param="out")  # an unknown scheme fails before any model work
    start = time.perf_counter()
    store_dtype = STORAGE_DTYPES[cfg.dtype]
    prompt_set = as_prompt_set(prompts)
    inputs = encode_prompts(tokenizer, prompt_set, max_length=cfg.max_length, chat_template=cfg.chat_template)
    tokens = sum(ids.shape[1] for ids in inputs)
    params = target_parameters(model, cfg.targets)
    specs = [TensorSpec(n, tuple(p.shape), dtype_name(store_dtype)) for n, p in params.items()]
    schedule = cfg.schedule
    layers = _decoder_layers(model, plan_groups(specs, 1)) if schedule == "pipelined" else None
    if isinstance(layers, torch.nn.ModuleList):
        layers = _chain_problem(model, layers, min(inputs, key=lambda ids: ids.shape[1])) or layers
    if schedule == "pipelined" and not isinstance(layers, torch.nn.ModuleList):
        log.info("schedule naive: %s", layers)
        schedule = "naive"
    ranks = _ranks(model)
    try:
        extract_plan = _agreed_plan(
            ranks, model, params, specs, [ids.shape[1] for ids in inputs], cfg, schedule, target
        )
    except BaseException:
        ranks.close()
        raise
    log.info("extraction plan: %s", extract_plan.describe())
    size = extract_plan.group_size
    plan = plan_groups(specs, size)
    prov = {
        **dict(provenance or {}),
        **_provenance(model, tokenizer, prompt_set, cfg.chat_template),
        "max_length": cfg.max_length,
        "estimator": cfg.estimator,
        "group_size": size,
        "targets": target_regex(cfg.targets).pattern,
        "seed": cfg.seed,
        "tokens": tokens,
        "schedule": schedule,
        "plan": extract_plan.to_dict(),
        "world_size": ranks.world,
        "dist_backend": ranks.backend,
    }
    attrs = {"estimator": cfg.estimator, "num_samples": len(prompt_set), "tokens": tokens}
    # a transformers model (get_input_embeddings); torch's stubs type unknown attributes as Tensor | Module
    input_device = cast(Any, model).get_input_embeddings().weight.device
    share = _Share(ranks, tuple(ranks.share(len(inputs))), len(inputs))
    inputs = [inputs[i].to(input_device) for i in share.indices]  # this rank's prompts
    peak_device = _reset_device_peaks(params.values())
    group_seconds: list[float] = []
    was_training = model.training
    model.eval()  # dropout would make every pass a different model

    with (
        _restore_mode(model, was_training),
        contextlib.closing(ranks),
        _rank_writer(ranks, out, target, plan, cfg, prov, attrs) as writer,
    ):
        todo = [g for g in plan if g.index not in writer.completed_groups]
        if len(todo) < len(plan):
            log.info("resuming: %d of %d groups already complete", len(plan) - len(todo), len(plan))
        boundary_bytes = 0
        if schedule == "pipelined":
            if todo:
                decoder = cast(torch.nn.ModuleList, layers)  # schedule stays pipelined only when it was found
                boundary_bytes = _pipelined(
                    model,
                    decoder,
                    plan,
                    todo,
                    params,
                    inputs,
                    cfg,
                    writer,
                    store_dtype,
                    group_seconds,
                    share,
                    offload=extract_plan.boundary == "cpu",
                )
        else:
            for group in todo:
                t0 = time.perf_counter()
                group_params = {t.name: params[t.name] for t in group.tensors}
                fisher = _group_fisher(
                    model, group_params, inputs, cfg.estimator, cfg.seed, _describe(group, len(plan)), share
                )
                _submit(writer, group, fisher, store_dtype, t0, group_seconds, len(plan))
                del fisher
        writer.finish()
        blocked = writer.blocked_seconds

    seconds = time.perf_counter() - start
    processed = tokens * len(todo)
    summary = ExtractSummary(
        store=str(out),
        estimator=cfg.estimator,
        schedule=schedule,
        group_size=size,
        groups_total=len(plan),
        groups_run=len(todo),
        num_prompts=len(prompt_set),
        tokens_per_pass=tokens,
        tokens_processed=processed,
        seconds=seconds,
        tokens_per_second=processed / seconds if seconds > 0 else 0.0,
        group_seconds=tuple(group_seconds),
        writer_blocked_seconds=blocked,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_device_bytes=peak_device(),
        boundary_bytes=boundary_bytes,
        plan=extract_plan,
        world_size=ranks.world,
        rank=ranks.rank,
    )
    log.info(
        "extracted %d groups x %d prompts (%d tokens per pass, %s schedule) in %.1f s: %.0f tokens/s, "
        "writer blocked %.2f s, peak RSS %.0f MiB, boundary tensors %.1f MiB",
        summary.groups_run,
        summary.num_prompts,
        tokens,
        schedule,
        seconds,
        summary.tokens_per_second,
        blocked,
        summary.peak_rss_bytes / 2**20,
        boundary_bytes / 2**20,
    )
    return summary


def _group_fisher(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    inputs: Sequence[torch.Tensor],
    estimator: str,
    seed: int,
    desc: str,
    share: _Share,
) -> dict[str, torch.Tensor]:
    """Mean over all ranks' prompts of each parameter's squared per-prompt gradient, fp32, on its device.

    ``inputs`` are this rank's prompts; ``share`` gives their global indices,
    which seed the sampled labels, so the estimate does not depend on how
    many ranks share the prompts.
    """
    with _accumulating(params, share) as acc, torch.enable_grad():
        for i, ids in zip(share.indices, progress(inputs, desc=desc, unit="prompt"), strict=True):
            _prompt_loss(model, ids, estimator, seed, i).backward()
    return acc


@contextlib.contextmanager
def _accumulating(params: Mapping[str, torch.nn.Parameter], share: _Share) -> Iterator[dict[str, torch.Tensor]]:
    """fp32 accumulators of ``params``' squared gradients while the block runs; at its end summed over the ranks
    and divided by the global prompt count.

    Inside, only ``params`` require grad, each with a post-accumulate hook that
    adds its squared gradient to its accumulator; on leaving, hooks are removed
    and nothing requires grad.  Every rank settles (:meth:`Ranks.settle`)
    before the sum, so an error in one rank's block fails every rank instead
    of leaving them waiting in the sum.
    """
    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    handles = []
    try:
        for name, p in params.items():
            p.grad = None
            p.requires_grad_(True)
            handles.append(p.register_post_accumulate_grad_hook(_square_into(acc[name])))
        try:
            yield acc
        except Exception as exc:
            share.ranks.settle(exc, "extract")
            raise
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    share.ranks.settle(None, "extract")
    share.ranks.all_reduce(acc.values())
    for a in acc.values():
        a.div_(share.total)


def _decoder_layers(model: torch.nn.Module, plan: Sequence[GroupInfo]) -> torch.nn.ModuleList | str:
    """The ModuleList of decoder layers the plan's groups live in, or why the pipelined schedule cannot run."""
    config = getattr(model, "config", None)
    shared = getattr(getattr(config, "text_config", None) or config, "num_kv_shared_layers", 0) or 0
    if shared > 0:
        return (
            f"the model shares k/v across layers (num_kv_shared_layers={shared}), so a layer's inputs "
            "do not all come from the layer below"
        )
    if any(not g.layers for g in plan):
        return "some target weights are outside the decoder layers"
    name, layer = plan[0].tensors[0].name, plan[0].layers[0]
    prefix = name.split(f".{layer}.")[0]
    try:
        layers = model.get_submodule(prefix)
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList) or not all(
        t.name.startswith(f"{prefix}.{parse_name(t.name)[0]}.") for g in plan for t in g.tensors
    ):
        return f"the decoder layers were not found as one ModuleList (looked at {prefix!r})"
    return layers


def _chain_problem(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor) -> str | None:
    """Why the pipelined schedule's premise fails for ``model``, from one no-grad forward of ``ids``; None if it holds.

    The premise: the model calls each decoder layer once, in order, and layer
    k+1's input hidden state is layer k's output itself (nothing between
    them changes it), so that re-running a group's layers from a recorded
    input and back-propagating the gradient recorded at the next group's
    input is the model's own computation.
    """
    order: list[int] = []
    outputs: dict[int, torch.Tensor] = {}
    problems: list[str] = []

    def pre(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            order.append(index)
            previous = outputs.pop(index - 1, None)
            if index > 0 and previous is not None and not _same_tensor(previous, _hidden_arg(args, kwargs)):
                problems.append(f"decoder layer {index - 1}'s output is not layer {index}'s input")

        return hook

    def post(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs[index] = _hidden_of(output)

        return hook

    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    device = cast(Any, model).get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if order != list(range(len(layers))):
        return f"the model does not call its decoder layers once each, in order (it called {order[:12]})"
    return problems[0] if problems else None


def _hidden_arg(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _hidden_of(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _same_tensor(a: Any, b: Any) -> bool:
    """Whether ``b`` is ``a`` or a view of the same bytes with the same shape, dtype and device."""
    if a is b:
        return True
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return (a.device, a.dtype, a.shape, a.data_ptr()) == (b.device, b.dtype, b.shape, b.data_ptr())


def _layer_device(layer: torch.nn.Module) -> torch.device:
    """Where ``layer`` computes: accelerate's execution device under a device map, else its weights' device."""
    hook = getattr(layer, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    tensor = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _keep(tensor: torch.Tensor, device: torch.device, offload: bool) -> torch.Tensor:
    """``tensor`` (detached) where a boundary tensor is kept: on ``device``, or in CPU memory (pinned with CUDA)."""
    if not offload:
        return tensor.to(device)
    if tensor.device.type == "cpu":
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
    return out.copy_(tensor)


# One decoder layer call, recorded: whether the hidden state came positionally, the other arguments, the kwargs.
_Call = tuple[bool, tuple[Any, ...], dict[str, Any]]


def _pipelined(
    model: torch.nn.Module,
    layers: torch.nn.ModuleList,
    plan: Sequence[GroupInfo],
    todo: Sequence[GroupInfo],
    params: Mapping[str, torch.nn.Parameter],
    inputs: Sequence[torch.Tensor],
    cfg: ExtractConfig,
    writer: _RankWriter,
    store_dtype: torch.dtype,
    group_seconds: list[float],
    share: _Share,
    *,
    offload: bool = False,
) -> int:
    """Run the boundary-pipelined schedule over the groups in ``todo``, from the top one down.

    Pass 1 runs each prompt through the whole model once, with the top
    unfinished group's weights requiring grad and its input made a leaf whose
    gradient is recorded, recording (detached) the hidden state entering each
    lower unfinished group and every lower layer's arguments.  Each lower group
    then re-runs the layers from its own first one up to the next group above
    (complete groups between them, on resume, are re-run without grad on their
    weights) from the recorded state, and back-propagates the gradient
    recorded at the input of the group above; the lowest group needs no input
    gradient.  States and gradients are released per prompt once used.

    Placement (one device or an accelerate device map): a recorded state and
    a layer's recorded arguments live on the device of the layer that
    consumes them, a recorded gradient on the device of the last layer of the
    group below (whose output it is back-propagated into); with ``offload``
    states and gradients are kept in CPU memory instead (pinned where CUDA
    is present) and moved to those devices when used.  Accumulators are on
    each weight's device.  Pass 1 checks, per call, that each recorded
    layer's input is the previous layer's output (:func:`_chain_problem`
    checked it on one prompt before the store was created).
    Returns the bytes of the recorded hidden states plus one boundary's
    gradients.
    """
    groups = list(reversed(todo))
    firsts = [g.layers[0] for g in groups]
    n = len(inputs)
    calls: dict[int, list[_Call]] = {i: [] for i in range(firsts[-1], firsts[0])}
    states: dict[int, list[torch.Tensor]] = {i: [] for i in firsts[1:]}
    grads: deque[torch.Tensor] = deque()
    devices = {i: _layer_device(layer) for i, layer in enumerate(layers)}
    outputs: dict[int, torch.Tensor] = {}

    def record_grad(leaf: torch.Tensor) -> None:
        # set: the hook runs after accumulation; kept for the last layer of the group below
        grads.append(_keep(cast(torch.Tensor, leaf.grad), devices[firsts[0] - 1], offload))
        leaf.grad = None

    def pre_hook(index: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest, kw = (args[1:], kwargs) if args else (args, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index > firsts[-1] and not _same_tensor(outputs.pop(index - 1, None), hidden):
                raise BadInputError(
                    f"decoder layer {index - 1}'s output is not layer {index}'s input for this prompt, so the "
                    "pipelined schedule does not apply; pass schedule='naive'",
                    param="schedule",
                )
            if index in calls:
                calls[index].append((bool(args), _to_device(rest, devices[index]), _to_device(kw, devices[index])))
            if index in states:
                states[index].append(_keep(hidden.detach(), devices[index], offload))
            if index != firsts[0] or len(groups) == 1:  # one group: no gradient is needed at its input
                return None
            leaf = hidden.detach().requires_grad_(True)
            leaf.register_post_accumulate_grad_hook(record_grad)
            return ((leaf, *rest), kw) if args else (rest, {**kw, "hidden_states": leaf})

        return hook

    def own(group: GroupInfo) -> dict[str, torch.nn.Parameter]:
        return {t.name: params[t.name] for t in group.tensors}

    def post_hook(index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            outputs[index] = _hidden_of(output)

        return hook

    t0 = time.perf_counter()
    hooked = range(firsts[-1], firsts[0] + 1)  # the layers of calls and states, and the top group's first
    handles = [layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i in hooked]
    handles += [layers[i].register_forward_hook(post_hook(i)) for i in hooked[:-1]]
    try:
        acc = _group_fisher(
            model, own(groups[0]), inputs, cfg.estimator, cfg.seed, _describe(groups[0], len(plan)), share
        )
    finally:
        for h in handles:
            h.remove()
        outputs.clear()
    boundary = sum(t.nbytes for ts in states.values() for t in ts) + sum(g.nbytes for g in grads)
    log.info("pipelined schedule: boundary tensors %.1f MiB", boundary / 2**20)
    _submit(writer, groups[0], acc, store_dtype, t0, group_seconds, len(plan))
    del acc
    for above, group in itertools.pairwise(groups):
        t0 = time.perf_counter()
        starts = deque(states.pop(group.layers[0]))
        lowest = group is groups[-1]
        below: deque[torch.Tensor] = deque()
        with _accumulating(own(group), share) as acc, torch.enable_grad():
            for i in progress(range(n), desc=_describe(group, len(plan)), unit="prompt"):
                start = starts.popleft().to(devices[group.layers[0]])
                if not lowest:
                    start.requires_grad_(True)
                hidden = start
                for index in range(group.layers[0], above.layers[0]):
                    positional, rest, kw = calls[index][i]
                    out = (
                        layers[index](hidden, *rest, **kw)
                        if positional
                        else layers[index](*rest, hidden_states=hidden, **kw)
                    )
                    hidden = out[0] if isinstance(out, tuple) else out
                torch.autograd.backward(hidden, grads.popleft().to(hidden.device))
                if not lowest:
                    below.append(_keep(cast(torch.Tensor, start.grad), devices[group.layers[0] - 1], offload))
        grads = below
        for index in range(group.layers[0], above.layers[0]):
            del calls[index]
        _submit(writer, group, acc, store_dtype, t0, group_seconds, len(plan))
        del acc
    return boundary


def _to_device(tree: Any, device: torch.device) -> Any:
    """``tree``'s tensors detached, on ``device`` (no copy where they already are)."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().to(device), tree)


def _prompt_loss(model: torch.nn.Module, ids: torch.Tensor, estimator: str, seed: int, index: int) -> torch.Tensor:
    """Prompt ``index``'s mean next-token cross-entropy against its estimator's labels."""
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    labels = ids[0, 1:].to(logits.device) if estimator == "empirical" else _sampled_labels(logits, seed, index)
    return F.cross_entropy(logits, labels)


def _submit(
    writer: _RankWriter,
    group: GroupInfo,
    fisher: dict[str, torch.Tensor],
    store_dtype: torch.dtype,
    t0: float,
    group_seconds: list[float],
    total: int,
) -> None:
    """Hand one group's fp32 means to the writer in the storage dtype (on rank 0: only it writes) and log its time."""
    writer.submit_group(group.index, {n: f.to(store_dtype).cpu() for n, f in fisher.items()} if writer.writes else {})
    group_seconds.append(time.perf_counter() - t0)
    log.info("%s: %.1f s", _describe(group, total), group_seconds[-1])


@contextlib.contextmanager
def _restore_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    try:
        yield
    finally:
        model.train(training)


def _square_into(acc: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook: ``acc += grad.float()**2``, then free the gradient."""

    def hook(param: torch.Tensor) -> None:
        grad = cast(torch.Tensor, param.grad).float()  # set: the hook runs after accumulation
        acc.addcmul_(grad, grad)
        param.grad = None

    return hook


def _sampled_labels(logits: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """One label per position drawn from the model's predictive distribution, seeded by ``(seed, index)``."""
    generator = torch.Generator(device=logits.device).manual_seed(hash((seed, index)) & (2**63 - 1))
    probs = torch.softmax(logits.detach(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def storage_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a storage dtype (``bfloat16``/``bf16`` or ``float32``/``fp32``); fp16 is refused, saying why.

    Args:
        dtype: a dtype name or alias (:func:`fisherstore.dtypes.canonical_dtype`).

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.
    """
    return STORAGE_DTYPES[_storage_dtype_name(dtype)]


_FP16_REFUSED = (
    "dtype fp16 is refused: Fisher values span ~20 decades and ~8% of them flush to zero in fp16 "
    "(its smallest value is 6e-8); use bfloat16 (same range as float32) or float32"
)


def _storage_dtype_name(dtype: Any) -> str:
    return canonical_dtype(dtype, param="dtype", allowed=STORAGE_DTYPES, refused={"float16": _FP16_REFUSED})


def parse_group_size(value: int | str) -> int:
    """A group size given as an integer or a numeric string (``"auto"`` is handled by the caller)."""
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise BadInputError(
            f"group_size {value!r} is neither 'auto' nor a positive integer", param="group_size"
        ) from None
    if size < 1:
        raise BadInputError(f"group_size must be >= 1, got {value!r}", param="group_size")
    return size


def _describe(group: GroupInfo, total: int) -> str:
    layers = f"layers {group.layers[0]}-{group.layers[-1]}" if group.layers else "non-layer tensors"
    return f"group {group.index + 1}/{total} ({layers})"


def _versions() -> dict[str, str]:
    out = {}
    for package in ("fisherstore", "torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _provenance(model: torch.nn.Module, tokenizer: Any, prompts: PromptSet, chat_template: bool) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None) if chat_template else None
    return {
        "model_class": type(model).__name__,
        "config_hash": config_hash(model.config),
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")) or type(tokenizer).__name__,
        "tokenizer_vocab_size": len(tokenizer),
        **prompts.provenance(),
        "chat_template": chat_template,
        "chat_template_sha256": sha256_of(template.encode()) if template else None,
        "versions": _versions(),
    }


def _check_resumable(stored: Mapping[str, Any], current: Mapping[str, Any], out: str | Path) -> None:
    diff = [k for k in _RESUME_KEYS if stored.get(k) != current.get(k)]
    if diff:
        k = diff[0]
        raise BadInputError(
            f"{out}: cannot resume: the store was extracted with {k}={stored.get(k)!r}, this run has "
            f"{current.get(k)!r}; rerun with the same model, prompts and options, or write a new store"
        )


def _reset_device_peaks(params: Any) -> Callable[[], int | None]:
    """Reset CUDA peak statistics of the devices holding ``params``; return a reader of their summed peak."""
    devices = sorted({p.device for p in params if p.device.type == "cuda"}, key=str)
    for d in devices:
        torch.cuda.reset_peak_memory_stats(d)
    if not devices:
        return lambda: None
    return lambda: sum(torch.cuda.max_memory_allocated(d) for d in devices)


# -- torchrun: prompts shared across ranks, rank 0 writes ------------------------------------


@dataclass(frozen=True)
class _Share:
    """This rank's prompts: their global indices (which seed the sampled labels), the global count, the ranks."""

    ranks: Ranks
    indices: tuple[int, ...]
    total: int


def _ranks(model: torch.nn.Module) -> Ranks:
    """This process's ranks; tensors are summed with NCCL when the model's inputs live on a GPU, else gloo."""
    device = cast(Any, model).get_input_embeddings().weight.device
    return Ranks(default_backend(device), device)


class _RankWriter:
    """The store's writer on rank 0; on the other ranks a stand-in that writes nothing.

    Every call settles on every rank (:meth:`Ranks.settle`): a write that
    fails on rank 0 (a full disk, say) fails every rank at the same point.
    """

    def __init__(self, writer: StoreWriter | None, ranks: Ranks, completed: set[int]) -> None:
        self._writer, self._ranks = writer, ranks
        self.completed_groups = completed
        self.writes = writer is not None

    def submit_group(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._settled(lambda w: w.submit_group(index, tensors))

    def finish(self) -> None:
        self._settled(lambda w: w.finish())

    @property
    def blocked_seconds(self) -> float:
        return self._writer.blocked_seconds if self._writer is not None else 0.0

    def _settled(self, call: Callable[[StoreWriter], Any]) -> None:
        failure = None
        if self._writer is not None:
            try:
                call(self._writer)
            except Exception as exc:
                failure = exc
        self._ranks.settle(failure, "extract")


@contextlib.contextmanager
def _rank_writer(
    ranks: Ranks,
    out: str | Path,
    target: Path | Remote,
    plan: Sequence[GroupInfo],
    cfg: ExtractConfig,
    prov: dict[str, Any],
    attrs: dict[str, Any],
) -> Iterator[_RankWriter]:
    """Rank 0 alone opens the store at ``target`` (a local path or an URL), reading its manifest on resume;
    every rank learns which groups are complete.

    Before anything is written, rank 0 checks that every rank runs the same
    extraction (resume keys and group plan); any refusal on rank 0 (a bad
    ``out``, a store that cannot be resumed, ranks that disagree) is raised
    on every rank.
    """
    agreed = {k: prov.get(k) for k in (*_RESUME_KEYS, "group_size", "schedule", "plan")}
    views = ranks.gather(agreed)
    with contextlib.ExitStack() as stack:
        writer: StoreWriter | None = None
        failure: Exception | None = None
        if ranks.rank == 0:
            try:
                for rank, view in enumerate(views or []):
                    diff = [k for k in agreed if view[k] != agreed[k]]
                    if diff:
                        raise BadInputError(
                            f"rank {rank} runs another extraction than rank 0: {diff[0]}={view[diff[0]]!r}, "
                            f"rank 0 has {agreed[diff[0]]!r}; give every rank the same model, prompts and options"
                        )
                writer = stack.enter_context(
                    StoreWriter.create(
                        target,
                        plan,
                        backend=cfg.backend,
                        backend_options=dict(cfg.backend_options) if cfg.backend_options is not None else None,
                        kind="fisher",
                        provenance=prov,
                        attrs=attrs,
                        resume=cfg.resume,
                        overwrite=cfg.overwrite,
                    )
                )
                _check_resumable(writer.manifest.provenance, prov, out)
            except Exception as exc:
                failure = exc
        ranks.settle(failure, "extract")
        completed: set[int] = ranks.broadcast(writer.completed_groups if writer is not None else None)
        yield _RankWriter(writer, ranks, completed)
