"""``fisherstore convert``: between fisher.pt, safetensors stores and zarr stores."""

from __future__ import annotations

import argparse

from fisherstore.convert import TARGETS, convert, infer_target

EPILOG = """\
The target format comes from --to, else from DST: *.pt → fisher.pt, *.zarr → zarr store,
anything else → safetensors store. Bytes stream through a bounded buffer (--chunk-mb), so
a 58 GB fisher.pt converts in a few hundred MB of memory. Checksums recorded in a source
store are verified on the way. DST appears only once complete.

examples:
  fisherstore convert fisher.pt store/
  fisherstore convert fisher.pt store.zarr --compression blosc-zstd-bitshuffle
  fisherstore convert store/ fisher-roundtrip.pt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between fisher.pt, safetensors and zarr stores",
        description="Stream every tensor of SRC into a new DST of another format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="store directory, fisher.pt or .safetensors file")
    p.add_argument("dst", help="new store directory or .pt file")
    p.add_argument("--to", choices=TARGETS, help="target format (default: from DST's name)")
    p.add_argument("--compression", help="zarr only: none (default), zstd, blosc-zstd-shuffle, blosc-zstd-bitshuffle")
    p.add_argument("--level", type=int, help="zarr only: compression level")
    p.add_argument("--chunk-mb", type=float, help="zarr only: target size of a row chunk in MiB (default 4)")
    p.add_argument("--shard-mb", type=float, help="zarr only: target size of a shard file in MiB")
    p.add_argument("--group-size", type=int, default=8, help="layers per shard when SRC is a single file (default 8)")
    p.add_argument("--buffer-mb", type=int, default=64, help="streaming buffer size in MiB (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists (only after the new one is complete)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    to = args.to or infer_target(__import__("pathlib").Path(args.dst))
    options = {
        k: v
        for k, v in {"compression": args.compression, "level": args.level, "chunk_mb": args.chunk_mb, "shard_mb": args.shard_mb}.items()
        if v is not None
    }
    if options and to != "zarr":
        from fisherstore.errors import BadInputError

        raise BadInputError(f"--{next(iter(options)).replace('_', '-')} applies to zarr targets only (target is {to})")
    convert(args.src, args.dst, to=to, backend_options=options, group_size=args.group_size,
            overwrite=args.overwrite, chunk_bytes=args.buffer_mb << 20)
    print(f"wrote {args.dst} ({to})")
    return 0
