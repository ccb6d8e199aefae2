"""Kill trials (issue 16): SIGKILL each long command at >= 20 of its durable writes, rerun, count what went wrong.

Commands, each on the tiny random Gemma-4 (its Fisher-like store as the source of convert and svd):

  convert → safetensors, convert → zarr, convert → compressed zarr (blosc-zstd-bitshuffle),
  extract (tiny-gemma4, 2 prompts, one layer per group), svd (rank 2),
  merge (two such stores of 3 and 5 prompts; rerun with --resume),
  and on s3:// destinations (a real S3 server on loopback: moto behind a proxy, fisherstore.testing.s3):
  convert → s3:// zarr, extract → s3://, svd s3:// → s3:// (each rerun with --resume)

An uninterrupted run counts its durable writes (every write, file fsync and directory
fsync: fisherstore._io's fault points) and is the reference; the kill points are spread
evenly over them, first and last included.  After each kill: does what is left claim to be
complete without being so (wrong-complete), what debris is there; then the command is rerun
(with --resume where it left a destination and the command resumes; convert reruns plainly)
and the result compared, file by file, with the reference (manifests compared without their
timestamps), the source checked unchanged, and the trial's folder checked to hold nothing
but the destination.  Fsync stays on (a real run); each command is a fresh interpreter.
On s3:// the durable writes are object PUTs and completed uploads, the comparison is
object by object, "the trial's folder" is the listing of the trial's prefix, and S3
multipart uploads a kill left open (no object: invisible to listings and reads) are
counted apart (open uploads).

Usage: python benchmarks/bench_kills.py [--points 20] [--only convert-safetensors,merge,extract-s3] [--workdir DIR]
Writes results/reliability_kills.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import this_command, write_results

from fisherstore.testing.kills import KillReport, run_kill_trials

ZSTD = ("--compression", "blosc-zstd-bitshuffle")
ZARR = ("--backend", "zarr")  # on s3://: an object per array and shard, so >= 20 durable writes
EXTRACT = ("--num-prompts", "2", "--max-length", "16", "--group-size", "1", "--dtype", "fp32")

#: The labels of the commands whose destinations are s3:// URLs (they need the S3 server).
S3_LABELS = ("convert-s3-zarr", "extract-s3", "svd-s3")


def commands(src: Path, s3: Any = None) -> dict[str, tuple[str, Any, str | None, Any]]:
    """label → (destination name, argv(dst), resume flag, source); the s3:// ones only with a server."""
    merge = src.parent / "merge"
    chosen: dict[str, tuple[str, Any, str | None, Any]] = {
        "convert-safetensors": ("out", lambda d: ["convert", src, "-o", d], None, src),
        "convert-zarr": ("out.zarr", lambda d: ["convert", src, "-o", d], None, src),
        "convert-zarr-zstd": ("out.zarr", lambda d: ["convert", src, "-o", d, *ZSTD], None, src),
        "extract": ("fisher", lambda d: ["extract", "tiny-gemma4", "--out", d, *EXTRACT], "--resume", None),
        "svd": ("masks", lambda d: ["svd", src, "--rank", "2", "-o", d], "--resume", src),
        "merge": ("merged", lambda d: ["merge", merge / "a", merge / "b", "-o", d], "--resume", merge),
    }
    if s3 is not None:
        opts = ("--storage-options", json.dumps(s3.options))
        s3src = "s3://kills/src"
        chosen |= {
            "convert-s3-zarr": ("out.zarr", lambda d: ["convert", src, "-o", d, *opts], "--resume", src),
            "extract-s3": (
                "fisher",
                lambda d: ["extract", "tiny-gemma4", "--out", d, *EXTRACT, *ZARR, *opts],
                "--resume",
                None,
            ),
            "svd-s3": ("masks", lambda d: ["svd", s3src, "--rank", "2", "-o", d, *ZARR, *opts], "--resume", s3src),
        }
    return chosen


def make_source(work: Path, s3: Any = None) -> Path:
    """The source store and two merge inputs (3 and 5 prompts), written by a child process (this one runs no
    torch op, so it may fork safely); with an S3 server, the source is uploaded to s3://kills/src too."""
    import subprocess

    code = (
        "import json, sys, torch\n"
        "from pathlib import Path\n"
        "from fisherstore.manifest import TensorSpec\n"
        "from fisherstore.testing import fisher_like_tensors, tiny_gemma4_config, write_store\n"
        "from fisherstore.writer import StoreWriter, plan_groups\n"
        "tensors = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16)\n"
        "write_store(sys.argv[1], tensors, group_size=1)\n"
        "other = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16, seed=1)\n"
        "for name, ts, n in (('a', tensors, 3), ('b', other, 5)):\n"
        "    plan = plan_groups([TensorSpec.of(k, t) for k, t in ts.items()], 1)\n"
        "    with StoreWriter.create(Path(sys.argv[2]) / name, plan, provenance={'num_prompts': n}) as w:\n"
        "        for g in plan:\n"
        "            w.write_group(g.index, {s.name: ts[s.name] for s in g.tensors})\n"
        "        w.finish()\n"
        "if len(sys.argv) > 3:\n"
        "    write_store('s3://kills/src', tensors, group_size=1, storage_options=json.loads(sys.argv[3]))\n"
    )
    path = work / "source" / "src"
    extra = [json.dumps(s3.options)] if s3 is not None else []
    subprocess.run([sys.executable, "-c", code, str(path), str(path.parent / "merge"), *extra], check=True)
    return path


def table(reports: list[KillReport]) -> str:
    head = (
        "| command | durable writes | trials | killed | absent / incomplete / complete after the kill "
        "| debris after the kill | debris left after the rerun | wrong-complete | rerun mismatches "
        "| source changed | S3 uploads left open |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in reports:
        c = r.counts()
        rows.append(
            f"| `{r.command}` | {r.events} | {c['trials']} | {c['killed']} | {c['absent_after_kill']} / "
            f"{c['incomplete_after_kill']} / {c['complete_after_kill']} | {c['debris_after_kill']} | "
            f"{c['debris_left']} | {c['wrong_complete']} | {c['mismatches']} | {c['source_changed']} | "
            f"{c.get('open_uploads', 0) if r.label in S3_LABELS else '-'} |"
        )
    return head + "\n".join(rows)


def _merged(reports: list[KillReport], order: list[str]) -> list[KillReport]:
    """``reports`` plus the other commands' reports of results/reliability_kills.json, in ``order``."""
    import json

    from fisherstore.testing.kills import Trial

    path = Path(__file__).resolve().parent / "results" / "reliability_kills.json"
    have = {r.label: r for r in reports}
    if path.exists():
        for d in json.loads(path.read_text()).get("commands", []):
            if d["label"] not in have:
                old = KillReport(d["label"], d["command"], d["events"], [Trial(**t) for t in d["trials"]])
                have[old.label] = old
    return [have[k] for k in order if k in have]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=20, help="kill points per command (default 20)")
    ap.add_argument("--only", help="comma-separated labels (default: all)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one, removed)")
    ap.add_argument(
        "--fork",
        action="store_true",
        help="run trials in forked children of this process instead of fresh interpreters (no start-up: torch "
        "and transformers are imported here once, no torch op runs here; the kills are the same)",
    )
    args = ap.parse_args()
    if args.fork:
        import importlib

        for module in ("torch", "transformers", "fisherstore.cli.cmd_extract", "fisherstore.cli.cmd_svd"):
            importlib.import_module(module)
        importlib.import_module("fisherstore.cli.cmd_convert")
        importlib.import_module("fisherstore.cli.cmd_merge")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fsbench-kills-"))
    only = args.only.split(",") if args.only else None
    with contextlib.ExitStack() as stack:
        s3 = None
        if only is None or set(only) & set(S3_LABELS):
            from fisherstore.testing.s3 import S3Server

            s3 = stack.enter_context(S3Server())
            s3.make_bucket("kills")
        _run_all(args, work, only, s3)


def _run_all(args: argparse.Namespace, work: Path, only: list[str] | None, s3: Any) -> None:
    try:
        src = make_source(work, s3)
        chosen = commands(src, s3)
        if only:
            chosen = {k: v for k, v in chosen.items() if k in only}
        reports = []
        for label, (name, argv, resume, source) in chosen.items():
            report = run_kill_trials(
                label,
                argv,
                work / label,
                name=name,
                points=args.points,
                source=source,
                resume_flag=resume,
                env={"OMP_NUM_THREADS": "1"},
                fork=args.fork,
                remote=f"s3://kills/{label}" if label in S3_LABELS else None,
                storage_options=s3.options if s3 is not None else None,
            )
            report.command = report.command.replace(str(src.parent / "merge"), "IN").replace(str(src), "SRC")
            if s3 is not None:
                report.command = report.command.replace(json.dumps(s3.options), "OPTS").replace("'OPTS'", "OPTS")
            reports.append(report)
            print(label, report.events, report.counts(), flush=True)
            bad = [t for t in report.trials if t.note]
            for t in bad:
                print(f"  point {t.point}: {t.note}", flush=True)
        if only:  # keep the other commands' figures of an earlier run
            reports = _merged(reports, [*commands(src), *S3_LABELS])
        write_results(
            "reliability_kills",
            this_command(),
            {"commands": [r.to_dict() for r in reports]},
            table(reports) + "\n\nSRC: a safetensors store of the tiny random Gemma-4's Fisher-like tensors"
            " (bf16, one layer per group); IN/a, IN/b: two such stores (other values) of 3 and 5 prompts;"
            " s3://kills/src: SRC uploaded; OPTS: the S3 server's storage options (moto on loopback)."
            "\nOn s3:// nothing is written beside a destination (no temporaries, no lock object yet), so debris"
            " after the kill is 0 there; an S3 multipart upload a kill left open is no object (counted apart).\n"
            "A killed merge keeps its committed groups; --resume merges only the missing ones."
            "\nA kill right after the final rename leaves a complete destination (counted as complete after the kill);"
            "\nits rerun then says the destination exists (exit 2) and removes the dead run's lock file.",
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
