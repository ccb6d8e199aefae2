"""``fisherstore svd``: top-k singular modes of every Fisher tensor → a mask store."""

from __future__ import annotations

import argparse
import os

from fisherstore.errors import BadInputError
from fisherstore.masks import describe_masks, open_masks
from fisherstore.svd import DEFAULT_MAX_MEMORY, TRANSFORMS, SVDConfig, svd_store

from ._common import (
    add_out_option,
    add_storage_options,
    add_zarr_options,
    format_kind_summary,
    human_bytes,
    parse_size,
    print_json,
    storage_options,
    zarr_options,
)

EPILOG = """\
How: each tensor F (m x n) is decomposed on its own, so tensors run in parallel (--workers
processes, or torchrun ranks). Large tensors use a randomized range finder that streams F's
rows from the store, 2 + 2*power-iters reads per tensor, in O((m+n)(k+p)) memory plus one
row block; when the whole tensor fits in --max-memory it is read once and kept. Tensors
whose k+p is a quarter of their short side or more (or all, with --exact) use exact SVD.
Everything is computed in fp32 (there are no bf16 SVD/QR kernels). The result is a store
with kind "masks": <name>.U (m x k), <name>.S (k), <name>.V (n x k) per tensor, plus the
captured energy ||S||^2/||F||^2 and residual ||F - U S V^T|| of each in the manifest.
It is written group by group: --resume continues an interrupted run, bit-identically.

examples:
  fisherstore svd store/ --rank 64 -o masks/
  fisherstore svd store/ --rank 32 -o masks/ --tensors 'mlp' --workers 4 --max-memory 8GiB
  fisherstore svd fisher.pt --rank 64 -o masks/ --transform sqrt --dtype bf16
  fisherstore svd store/ --rank 64 -o masks.zarr --backend zarr --compression zstd
  fisherstore svd store/ --rank 64 -o masks/ --resume          # after a crash or kill
  torchrun --nproc-per-node 8 -m fisherstore.cli.main svd store/ --rank 64 -o masks/ --device cuda
  fisherstore info masks/                                      # per-tensor energy table
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "svd",
        help="top-k SVD of every Fisher tensor into a mask store",
        description="Compute the top-k singular modes F ~ U_k S_k V_k^T of each Fisher tensor of STORE "
        "and write them as a mask store (the instruct subspace LoRA training keeps out of).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", help="Fisher store directory, fisher.pt or .safetensors file")
    p.add_argument(
        "--rank", "-k", type=int, required=True, help="modes kept per tensor (min(k, m, n) for an m x n tensor)"
    )
    add_out_option(p, "new mask store directory", required=True, metavar="MASKS")
    p.add_argument("--oversample", type=int, help="extra random directions p (default max(10, k/4))")
    p.add_argument(
        "--power-iters",
        type=int,
        default=2,
        help="subspace iterations q; each costs two reads of a streamed tensor (default 2)",
    )
    p.add_argument("--tensors", metavar="REGEX", help="only tensors whose name matches REGEX (default: all matrices)")
    p.add_argument(
        "--transform",
        choices=sorted(TRANSFORMS),
        default="none",
        help="element-wise map applied before the SVD (default none)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        metavar="{float32,bfloat16,float16}",
        help="dtype U, S, V are stored in; aliases fp32, bf16, fp16 are accepted (default float32)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where to compute: cpu, cuda, cuda:1 (under torchrun 'cuda' means each rank's LOCAL_RANK)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes decomposing tensors in parallel (default 1)")
    p.add_argument(
        "--max-memory",
        type=parse_size,
        default=DEFAULT_MAX_MEMORY,
        help="bound on the decompositions' working set, shared by the workers "
        f"(default {human_bytes(DEFAULT_MAX_MEMORY)}); tensors larger than this are streamed",
    )
    p.add_argument("--exact", action="store_true", help="exact SVD for every tensor (each must fit in --max-memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test matrices (default 0)")
    p.add_argument(
        "--backend",
        choices=("safetensors", "zarr"),
        default="safetensors",
        help="container of the mask store (default safetensors)",
    )
    add_zarr_options(p)
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run into the same --out with the same options"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the per-tensor table as JSON")
    add_storage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = SVDConfig(
        rank=args.rank,
        oversample=args.oversample,
        power_iters=args.power_iters,
        transform=args.transform,
        dtype=args.dtype,
        device=args.device,
        max_memory=args.max_memory,
        exact=args.exact,
        seed=args.seed,
    )
    if args.resume and args.overwrite:
        raise BadInputError("--resume and --overwrite contradict each other; pick one")
    svd_store(
        args.store,
        args.out,
        cfg,
        tensors=args.tensors,
        workers=args.workers,
        resume=args.resume,
        overwrite=args.overwrite,
        backend=args.backend,
        backend_options=zarr_options(args, args.backend) or None,
        storage_options=storage_options(args),
    )
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    with open_masks(args.out, storage_options=storage_options(args)) as masks:
        rows = describe_masks(masks)
    if args.json:
        print_json(rows)
        return 0
    print(f"wrote {args.out}: masks of {len(rows)} tensors, rank {args.rank}")
    print(format_kind_summary(rows))
    return 0
