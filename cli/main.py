"""Entry point of the ``fisherstore`` command: global options, logging, errors → exit codes.

Exit codes: 0 success; 1 a check found a problem (``verify``) or an
unexpected internal error; 2 bad input or usage (one line on stderr; the
traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence

# fisherstore never calls numpy's BLAS (its linear algebra runs in torch, on MKL), but OpenBLAS starts a
# thread per core when numpy is imported, and they spin for a while: ~5% of a 2.2 GB conversion's CPU on
# 2 cores, taken from the read-ahead and writer threads.  A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from fisherstore import __version__
from fisherstore.errors import FisherStoreError

__all__ = ["build_parser", "main"]

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("extract", "info", "convert", "merge", "verify", "importance", "svd", "plot", "blend")

EPILOG = """\
typical session:
  fisherstore extract --out fisher/ --num-prompts 32   Fisher of the embedded SmolLM2-135M-Instruct
  fisherstore info fisher.pt                      what is in a legacy file
  fisherstore convert fisher.pt -o store/         stream it into a sharded safetensors store
  fisherstore convert store/ -o store.zarr --compression blosc-zstd-bitshuffle
  fisherstore merge shard-0/ shard-1/ -o store/   one store from stores of disjoint prompt sets
  fisherstore verify store/                       check every checksum (exit 1 if corrupt)
  fisherstore importance store/ -o layer_importance.json
  fisherstore svd store/ --rank 8 -o masks/       top-k subspaces, out of core
  fisherstore plot masks/ -o profile.png
  fisherstore blend adapter/ --importance store/ -o blended/

Run 'fisherstore COMMAND --help' for each command's options and examples.
"""


def build_parser(command: str | None = None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` only that sub-command is registered (none for ``--version``).

    Registering a sub-command imports its module, and some import torch and
    transformers (seconds); a run needs only its own, ``--help`` needs all.
    """
    parser = argparse.ArgumentParser(
        prog="fisherstore",
        description="Extract, store, read and use the diagonal Fisher information of large language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fisherstore {__version__}")
    _add_global_options(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = (command,) if command in COMMANDS else () if command is None and "--version" in argv else COMMANDS
    for name in names:
        importlib.import_module(f"fisherstore.cli.cmd_{name}").register(sub)
    for subparser in sub.choices.values():  # global options may follow the command too
        _add_global_options(subparser.add_argument_group("global options"), argparse.SUPPRESS)
    return parser


def _add_global_options(group: argparse._ActionsContainer, default: object) -> None:
    """The options every command takes; after the command their default is SUPPRESS, so one given
    before the command is not reset by the sub-parser."""
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bars, warnings and errors only"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log what is being done (INFO level)"
    )
    group.add_argument(
        "--debug", action="store_true", default=default, help="debug logging and full tracebacks on errors"
    )
    group.add_argument(
        "--no-fsync",
        action="store_true",
        default=default,
        help="skip flushing writes to disk (still atomic against a crashed process, not against power loss; "
        "also FISHERSTORE_NO_FSYNC=1)",
    )


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command`` in a parser from :func:`build_parser`."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def in_cli_words(message: str, param: str | None, parser: argparse.ArgumentParser) -> str:
    """A library message with parameter names rewritten as the command's flags.

    For the command's switches ``overwrite=True`` becomes ``--overwrite`` and
    ``chat_template=False`` becomes ``--no-chat-template``; the error's own
    parameter (``rank must be >= 1``) becomes its flag wherever it stands as
    a word (``--rank must be >= 1``), and ``param=value`` becomes ``--flag
    value``.  Parameters the command has no visible flag for are left as
    they are.
    """
    actions = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]  # no hidden aliases
    flag_of = {id(a): max(a.option_strings, key=len) for a in actions}
    for a in actions:  # a switch: store_true answers dest=True, store_false (--no-x) answers dest=False
        if isinstance(a, argparse._StoreConstAction) and isinstance(a.const, bool):
            message = re.sub(rf"(?<![\w./-]){re.escape(a.dest)}={a.const}\b", flag_of[id(a)], message)
    flag = next((flag_of[id(a)] for a in actions if a.dest == param), None)
    if flag is not None and param is not None:
        # A word inside a path (out/x, runs/out) is part of the path, not the parameter.
        message = re.sub(rf"(?<![\w./-]){re.escape(param)}=", flag + " ", message)
        message = re.sub(rf"(?<![\w./-]){re.escape(param)}\b(?![\w/-])", flag, message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Global options take no values, so the first bare word is the command.
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command, argv)
    args = parser.parse_args(argv)  # exits here for --version and --help
    # Imported only once a command runs: logging (~15 ms), typing (~5 ms), fisherstore._io (numpy) for --no-fsync.
    import logging
    import traceback

    from fisherstore.progress import set_quiet

    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    set_quiet(args.quiet)
    if args.no_fsync:
        from fisherstore._io import set_durable

        set_durable(False)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fisherstore: interrupted", file=sys.stderr)
        return 130
    except (FisherStoreError, OSError) as exc:
        if args.debug:
            traceback.print_exc()
        text = _one_line(exc)
        if isinstance(exc, FisherStoreError):
            text = in_cli_words(text, exc.param, command_parser(parser, args.command))
        print(f"fisherstore: error: {text}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        print(
            f"fisherstore: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = _disk_error(exc) or f"{exc.filename}: {exc.strerror}"
    return " ".join(text.split())


def _disk_error(exc: OSError) -> str | None:
    """A full or read-only destination in words that say what to do; None for other OS errors."""
    import errno

    where = exc.filename
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        import shutil
        from pathlib import Path

        free = None
        for folder in Path(where).parents:  # the nearest folder that still exists
            try:
                free = shutil.disk_usage(folder).free
                break
            except OSError:
                continue
        need = f" ({exc.strerror})" if "reserve" in str(exc.strerror) else ""
        there = f"; {free:,} bytes free there" if free is not None else ""
        return f"no space left on device writing {where}{need}{there}: free space or choose another --out"
    if exc.errno == errno.EROFS:
        return f"cannot write {where}: read-only file system; choose another --out"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{where}: permission denied; choose another --out if it is the destination"
    return None


if __name__ == "__main__":
    sys.exit(main())
