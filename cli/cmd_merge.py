"""``fisherstore merge``: the Fisher of the union of disjoint prompt sets, from the stores of its parts."""

from __future__ import annotations

import argparse

from fisherstore.errors import BadInputError
from fisherstore.merging import DEFAULT_BLOCK_BYTES, MERGE_TARGETS, merge_stores

from ._common import (
    add_out_option,
    add_storage_options,
    add_zarr_options,
    human_bytes,
    parse_size,
    print_json,
    storage_options,
    zarr_options,
)

EPILOG = """\
Each input is a complete Fisher store of its own prompts (a job of a batch array, say).
The output is their prompt-weighted mean, F = sum_i n_i F_i / sum_i n_i, n_i being each
input's num_prompts: the store one run over all the prompts would have written, to fp32
rounding. Values are accumulated in fp32 a block at a time and stored in the inputs' dtype;
every input's checksums are verified while it is read; memory stays a few blocks per input
whatever the stores' size. Groups are committed one by one, so a killed merge leaves a store
that says INCOMPLETE (fisherstore info); --resume continues it (the committed groups are kept,
only the missing ones merged), given the same inputs in the same order, as its provenance
records them (anything else is refused, exit 2); a failed merge leaves nothing (a failed
resumed one leaves the store as it was).

Refused (exit 2, nothing written): fewer than two inputs, an output that is an input,
incomplete stores, and stores of different models (config hash), targets, estimators,
max lengths, chat templates, storage dtypes or tensors. The prompt sets must be disjoint:
a prompt in two inputs is counted twice (stores with the same prompt digest get a warning).

The output's provenance lists every input (path, num_prompts, weight, prompt digest, ...)
and records num_prompts as the sum.

examples:
  fisherstore merge shard-0/ shard-1/ shard-2/ -o fisher/
  fisherstore merge runs/fisher-* -o fisher.zarr --compression blosc-zstd-bitshuffle
  fisherstore merge a/ b/ -o merged/ --to safetensors --overwrite
  fisherstore merge shard-0/ shard-1/ -o fisher/ --resume   continue a killed merge
  fisherstore merge s3://b/shard-0 s3://b/shard-1 -o s3://b/fisher   on an object store
  fisherstore info merged/ --json        the inputs, under provenance.merged_from
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge Fisher stores of disjoint prompt sets (weighted by their prompt counts)",
        description="Write the Fisher of the union of the inputs' prompt sets: their mean weighted by num_prompts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="STORE", help="two or more complete Fisher stores (directories or URLs)"
    )
    add_out_option(p, "the new store (a directory or an URL such as s3://bucket/fisher)", metavar="DST")
    p.add_argument(
        "--to",
        "--format",
        dest="to",
        choices=MERGE_TARGETS,
        help="output format (default: zarr for a DST named *.zarr, else the first input's format and options)",
    )
    add_zarr_options(p)
    p.add_argument(
        "--buffer-size",
        dest="block_bytes",
        type=parse_size,
        default=DEFAULT_BLOCK_BYTES,
        metavar="SIZE",
        help="fp32 accumulator of one block, e.g. 16MiB; bounds memory to a few such blocks per input "
        f"(default {human_bytes(DEFAULT_BLOCK_BYTES)})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (removed when the merge starts)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed merge into DST (same inputs, same order): committed groups are kept",
    )
    add_storage_options(p)
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out is None:
        raise BadInputError("no destination: give -o/--out DST")
    if args.resume and args.overwrite:
        raise BadInputError("--resume and --overwrite contradict each other; pick one")
    summary = merge_stores(
        args.inputs,
        args.out,
        to=args.to,
        backend_options=zarr_options(args, "zarr") or None,  # the library refuses them for a safetensors output
        overwrite=args.overwrite,
        block_bytes=args.block_bytes,
        resume=args.resume,
        storage_options=storage_options(args),
    )
    if args.json:
        print_json(summary.to_dict())
    else:
        counts = " + ".join(map(str, summary.counts))
        print(
            f"wrote {summary.store} ({summary.backend}): {summary.tensors} tensors, {human_bytes(summary.nbytes)}, "
            f"{summary.num_prompts} prompts ({counts}) from {len(summary.inputs)} stores"
        )
    return 0
