"""``fisherstore convert``: between fisher.pt, safetensors stores and zarr stores."""

from __future__ import annotations

import argparse

from fisherstore.conversion import DEFAULT_BUFFER_BYTES, TARGETS, convert, infer_target
from fisherstore.errors import BadInputError

from ._common import (
    add_out_option,
    add_storage_options,
    add_zarr_options,
    human_bytes,
    parse_size,
    storage_options,
    zarr_options,
)

EPILOG = """\
The target format comes from --to, else from the name after -o/--out: *.pt → fisher.pt,
*.zarr → zarr store, anything else → safetensors store. Bytes stream through a bounded
buffer (--buffer-size), so a 58 GB fisher.pt converts in a few hundred MB of memory.
Checksums recorded in a source store are verified on the way. The output appears only
once complete.

examples:
  fisherstore convert fisher.pt -o store/
  fisherstore convert fisher.pt -o store.zarr --compression blosc-zstd-bitshuffle
  fisherstore convert store/ -o fisher-roundtrip.pt
  fisherstore convert fisher.pt -o s3://bucket/fisher.zarr       straight to an object store
  fisherstore convert fisher.pt -o s3://bucket/fisher.zarr --resume   continue an interrupted upload
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between fisher.pt, safetensors and zarr stores",
        description="Stream every tensor of SRC into a new store or fisher.pt of another format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="store directory, fisher.pt or .safetensors file (or an URL of a store or file)")
    p.add_argument("old_dst", nargs="?", help=argparse.SUPPRESS)  # the positional DST of earlier releases
    add_out_option(
        p, "new store directory or .pt file, or an URL of a new store (s3://bucket/x)", metavar="DST", dest="dst"
    )
    p.add_argument("--to", choices=TARGETS, help="target format (default: from the name of DST)")
    add_zarr_options(p)
    p.add_argument("--group-size", type=int, default=8, help="layers per shard when SRC is a single file (default 8)")
    p.add_argument(
        "--buffer-size",
        dest="buffer_bytes",
        type=parse_size,
        default=DEFAULT_BUFFER_BYTES,
        metavar="SIZE",
        help=f"size of a streaming buffer, e.g. 64MiB; bounds memory (default {human_bytes(DEFAULT_BUFFER_BYTES)})",
    )
    p.add_argument("--buffer-mb", dest="buffer_bytes", type=_mebibytes, help=argparse.SUPPRESS)  # old spelling
    p.add_argument(
        "--overwrite", action="store_true", help="replace DST if it exists (only after the new one is complete)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted conversion into DST (written in place)"
    )
    add_storage_options(p)
    p.set_defaults(func=run)


def _mebibytes(text: str) -> int:
    """``--buffer-mb N`` as bytes."""
    return int(text) << 20


def run(args: argparse.Namespace) -> int:
    if args.dst is not None and args.old_dst is not None:
        raise BadInputError("give the destination once: -o/--out DST (the positional DST is its old spelling)")
    dst = args.dst if args.dst is not None else args.old_dst
    if dst is None:
        raise BadInputError("no destination: give -o/--out DST")
    to = args.to or infer_target(dst)
    if args.resume and args.overwrite:
        raise BadInputError("--resume and --overwrite contradict each other; pick one")
    convert(
        args.src,
        dst,
        to=to,
        backend_options=zarr_options(args, to),
        group_size=args.group_size,
        overwrite=args.overwrite,
        buffer_bytes=args.buffer_bytes,
        resume=args.resume,
        storage_options=storage_options(args),
    )
    print(f"wrote {dst} ({to})")
    return 0
