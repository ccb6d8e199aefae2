"""Small helpers shared by the sub-commands: options spelled alike everywhere, JSON output, human sizes."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fisherstore.errors import BadInputError
from fisherstore.sizes import parse_bytes

__all__ = [
    "add_out_option",
    "add_storage_options",
    "add_zarr_options",
    "format_kind_summary",
    "format_mask_table",
    "human_bytes",
    "parse_size",
    "print_json",
    "storage_options",
    "zarr_options",
]


def human_bytes(n: float) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=1)
    sys.stdout.write("\n")


def parse_size(text: str) -> int:
    """A size option (``8GiB``, ``500MB``) as bytes (:func:`fisherstore.sizes.parse_bytes`), as an argparse type."""
    try:
        return parse_bytes(text)
    except BadInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_out_option(
    group: argparse._ActionsContainer,
    help: str,
    *,
    required: bool = False,
    metavar: str = "PATH",
    dest: str = "out",
    aliases: tuple[str, ...] = (),
) -> None:
    """``-o/--out``, the one spelling of a command's named output; ``aliases`` are old spellings, kept hidden.

    ``dest`` is the API parameter the value goes to, so the CLI can name this flag in a library error about it.
    """
    group.add_argument("-o", "--out", dest=dest, required=required, metavar=metavar, help=help)
    for alias in aliases:
        group.add_argument(alias, dest=dest, metavar=metavar, help=argparse.SUPPRESS)


def add_storage_options(group: argparse._ActionsContainer) -> None:
    """``--storage-options JSON``: keyword arguments of the filesystem of URL paths (``s3://...``), everywhere alike."""
    group.add_argument(
        "--storage-options",
        dest="storage_options",
        metavar="JSON",
        help="for URL paths (s3://bucket/store, memory://x): fsspec filesystem options as a JSON object, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000", "anon": false}\' (credentials otherwise come from the '
        "environment, ~/.aws and FSSPEC_S3_* variables)",
    )


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--storage-options`` parsed: a JSON object, or None when not given."""
    text = getattr(args, "storage_options", None)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"storage_options is not valid JSON ({exc})", param="storage_options") from None
    if not isinstance(value, dict):
        raise BadInputError(
            f"storage_options must be a JSON object, got {type(value).__name__}", param="storage_options"
        )
    return value


def add_zarr_options(group: argparse._ActionsContainer, chunking: bool = True) -> None:
    """The zarr backend's options, spelled the same in every command that writes a store."""
    group.add_argument(
        "--compression",
        help="zarr only: none (default), zstd, blosc-zstd-shuffle (smallest, ~1.49x on real bf16 Fisher, slow), "
        "blosc-zstd-bitshuffle (~1.46x), blosc-lz4-bitshuffle (fastest, ~1.43x)",
    )
    group.add_argument("--level", type=int, help="zarr only: compression level (default: the codec's)")
    if chunking:
        group.add_argument("--chunk-mb", type=float, help="zarr only: target size of a row chunk in MiB (default 4)")
        group.add_argument("--shard-mb", type=float, help="zarr only: target size of a shard file in MiB")


def zarr_options(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """The zarr options given on the command line; refused when the target is not zarr."""
    names = ("compression", "level", "chunk_mb", "shard_mb")
    options = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if options and target != "zarr":
        flag = "--" + next(iter(options)).replace("_", "-")
        raise BadInputError(f"{flag} applies to zarr targets only (target is {target})")
    return options


def format_mask_table(rows: list[dict[str, Any]]) -> str:
    """The per-tensor table of a mask store (rows from :func:`fisherstore.masks.describe_masks`)."""
    width = max((len(r["name"]) for r in rows), default=4)
    lines = [f"  {'tensor':<{width}}  {'shape':>12}  {'rank':>4}  {'method':<10}  {'energy':>9}  {'residual':>10}"]
    for r in rows:
        shape = "x".join(map(str, r["shape"]))
        energy = "-" if r["energy"] is None else f"{r['energy']:.6f}"
        residual = "-" if r["residual"] is None else f"{r['residual']:.4g}"
        lines.append(
            f"  {r['name']:<{width}}  {shape:>12}  {r['rank']:>4}  {r['method']:<10}  {energy:>9}  {residual:>10}"
        )
    return "\n".join(lines)


def format_kind_summary(rows: list[dict[str, Any]]) -> str:
    """Mean and minimum captured energy per projection kind."""
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        if r["energy"] is not None:
            by_kind.setdefault(r["kind"], []).append(r["energy"])
    return "\n".join(
        f"  {kind:<6} {len(v):>4} tensors  energy mean {sum(v) / len(v):.6f}  min {min(v):.6f}"
        for kind, v in sorted(by_kind.items())
    )
