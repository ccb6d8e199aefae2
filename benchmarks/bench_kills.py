"""Kill trials (issue 16): SIGKILL each long command at >= 20 of its durable writes, rerun, count what went wrong.

Commands, each on the tiny random Gemma-4 (its Fisher-like store as the source of convert and svd):

  convert → safetensors, convert → zarr, convert → compressed zarr (blosc-zstd-bitshuffle),
  extract (tiny-gemma4, 2 prompts, one layer per group), svd (rank 2)

An uninterrupted run counts its durable writes (every write, file fsync and directory
fsync: fisherstore._io's fault points) and is the reference; the kill points are spread
evenly over them, first and last included.  After each kill: does what is left claim to be
complete without being so (wrong-complete), what debris is there; then the command is rerun
(with --resume where it left a destination and the command resumes; convert reruns plainly)
and the result compared, file by file, with the reference (manifests compared without their
timestamps), the source checked unchanged, and the trial's folder checked to hold nothing
but the destination.  Fsync stays on (a real run); each command is a fresh interpreter.

Usage: python benchmarks/bench_kills.py [--points 20] [--only convert-safetensors,svd] [--workdir DIR]
Writes results/reliability_kills.{json,md}.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import this_command, write_results

from fisherstore.testing.kills import KillReport, run_kill_trials

ZSTD = ("--compression", "blosc-zstd-bitshuffle")
EXTRACT = ("--num-prompts", "2", "--max-length", "16", "--group-size", "1", "--dtype", "fp32")


def commands(src: Path) -> dict[str, tuple[str, object, str | None, Path | None]]:
    """label → (destination name, argv(dst), resume flag, source)."""
    return {
        "convert-safetensors": ("out", lambda d: ["convert", src, "-o", d], None, src),
        "convert-zarr": ("out.zarr", lambda d: ["convert", src, "-o", d], None, src),
        "convert-zarr-zstd": ("out.zarr", lambda d: ["convert", src, "-o", d, *ZSTD], None, src),
        "extract": ("fisher", lambda d: ["extract", "tiny-gemma4", "--out", d, *EXTRACT], "--resume", None),
        "svd": ("masks", lambda d: ["svd", src, "--rank", "2", "-o", d], "--resume", src),
    }


def make_source(work: Path) -> Path:
    """The source store, written by a child process (this one runs no torch op, so it may fork safely)."""
    import subprocess

    code = (
        "import sys, torch\n"
        "from fisherstore.testing import fisher_like_tensors, tiny_gemma4_config, write_store\n"
        "tensors = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16)\n"
        "write_store(sys.argv[1], tensors, group_size=1)\n"
    )
    path = work / "source" / "src"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    return path


def table(reports: list[KillReport]) -> str:
    head = (
        "| command | durable writes | trials | killed | absent / incomplete / complete after the kill "
        "| debris after the kill | debris left after the rerun | wrong-complete | rerun mismatches "
        "| source changed |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in reports:
        c = r.counts()
        rows.append(
            f"| `{r.command}` | {r.events} | {c['trials']} | {c['killed']} | {c['absent_after_kill']} / "
            f"{c['incomplete_after_kill']} / {c['complete_after_kill']} | {c['debris_after_kill']} | "
            f"{c['debris_left']} | {c['wrong_complete']} | {c['mismatches']} | {c['source_changed']} |"
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
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fsbench-kills-"))
    try:
        src = make_source(work)
        chosen = commands(src)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
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
            )
            report.command = report.command.replace(str(src), "SRC")
            reports.append(report)
            print(label, report.events, report.counts(), flush=True)
            bad = [t for t in report.trials if t.note]
            for t in bad:
                print(f"  point {t.point}: {t.note}", flush=True)
        if args.only:  # keep the other commands' figures of an earlier run
            reports = _merged(reports, list(commands(src)))
        write_results(
            "reliability_kills",
            this_command(),
            {"commands": [r.to_dict() for r in reports]},
            table(reports) + "\n\nSRC: a safetensors store of the tiny random Gemma-4's Fisher-like tensors"
            " (bf16, one layer per group)."
            "\nA kill right after the final rename leaves a complete destination (counted as complete after the kill);"
            "\nits rerun then says the destination exists (exit 2) and removes the dead run's lock file.",
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
