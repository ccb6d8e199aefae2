"""Kill points: SIGKILL long commands at chosen durable writes; the rerun must give the uninterrupted result.

Each trial (fisherstore.testing.kills): the command killed right after its N-th durable write, then
what it left is inspected (a destination that claims completeness must verify and equal the reference),
the command rerun (``--resume`` where it resumes and left a destination, plainly otherwise) and its
result compared with an uninterrupted run's, the source checked unchanged and the trial's folder checked
to hold nothing but the destination.  The fast tests fork this process for a few points of convert; the
slow ones run 20 points of each long command (conversions forked, extract and svd in a fresh interpreter:
torch's thread pools do not survive a fork of a process that used them).  The README's figures come
from benchmarks/bench_kills.py, which runs the same trials.
"""

from __future__ import annotations

import pytest

import fisherstore.cli.cmd_convert  # noqa: F401  (imported before forking: the children start at once)
from fisherstore.testing import write_store
from fisherstore.testing.kills import kill_points, run_kill_trials, same_result

ZSTD = ["--compression", "blosc-zstd-bitshuffle"]


@pytest.fixture(scope="module")
def source(tmp_path_factory, gemma_bf16):
    return write_store(tmp_path_factory.mktemp("kills") / "src", gemma_bf16, group_size=1)


def _assert_clean(report, minimum):
    counts = report.counts()
    assert counts["trials"] >= minimum and counts["killed"] == counts["trials"], report.to_dict()
    bad = {k: counts[k] for k in ("debris_left", "wrong_complete", "mismatches", "source_changed")}
    assert bad == dict.fromkeys(bad, 0), [t for t in report.trials if t.note]
    assert counts["debris_after_kill"] >= 1  # the kills did leave something for the reruns to clean


def test_kill_points_are_spread_and_distinct():
    assert kill_points(59, 20)[:3] == [1, 4, 7] and kill_points(59, 20)[-1] == 59 and len(kill_points(59, 20)) == 20
    assert kill_points(5, 20) == [1, 2, 3, 4, 5] and kill_points(0, 3) == [] and kill_points(9, 1) == [4]


@pytest.mark.parametrize(("name", "extra"), [("out", []), ("out.zarr", ZSTD)])
def test_killed_conversions_rerun_to_the_same_store(source, tmp_path, name, extra):
    report = run_kill_trials(
        f"convert {name}",
        lambda d: ["--no-fsync", "convert", source, "-o", d, *extra],
        tmp_path,
        name=name,
        points=3,
        source=source,
        fork=True,
    )
    _assert_clean(report, 3)
    assert report.trials[-1].after_kill == "complete"  # killed after the final rename: complete, and verifies


def test_same_result_ignores_timestamps_only(source, tmp_path):
    from fisherstore import convert

    a, b = convert(source, tmp_path / "a"), convert(source, tmp_path / "b")
    assert same_result(a, b) == ""
    shard = next(p for p in sorted(b.iterdir()) if p.suffix == ".safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert same_result(a, b) == f"{shard.name} differs"


def test_same_result_ignores_the_free_memory_a_plan_read(source, tmp_path):
    import json

    from fisherstore import convert

    stores = [convert(source, tmp_path / n) for n in ("a", "b")]

    def plan(store, **fields):
        path = store / "fisherstore.json"
        manifest = json.loads(path.read_text())
        manifest["provenance"]["plan"] = {"group_size": 1, "budget_bytes": 2**30, **fields}
        path.write_text(json.dumps(manifest))

    plan(stores[0])
    plan(stores[1], budget_bytes=2**31)
    assert same_result(*stores) == ""
    plan(stores[1], group_size=2)
    assert same_result(*stores) == "fisherstore.json differs"


SLOW = {
    "convert-safetensors": ("out", lambda s, d: ["convert", s, "-o", d], None),
    "convert-zarr": ("out.zarr", lambda s, d: ["convert", s, "-o", d], None),
    "convert-zarr-zstd": ("out.zarr", lambda s, d: ["convert", s, "-o", d, *ZSTD], None),
    "extract": (
        "fisher",
        lambda s, d: [
            "extract", "tiny-gemma4", "--out", d, "--num-prompts", "2", "--max-length", "16",
            "--group-size", "1", "--dtype", "fp32",
        ],
        "--resume",
    ),
    "svd": ("masks", lambda s, d: ["svd", s, "--rank", "2", "-o", d], "--resume"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(SLOW))
def test_twenty_kill_points_per_long_command(source, tmp_path, label):
    name, argv, resume = SLOW[label]
    report = run_kill_trials(
        label,
        lambda d: argv(source, d),
        tmp_path,
        name=name,
        points=20,
        source=None if label == "extract" else source,
        resume_flag=resume,
        env={"OMP_NUM_THREADS": "1"},
        fork=label.startswith("convert"),  # no torch op runs in a conversion: forking this process is safe
    )
    _assert_clean(report, 20)
