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

import itertools
import json
import signal

import pytest
import torch

import fisherstore.cli.cmd_convert
import fisherstore.cli.cmd_merge  # noqa: F401  (both imported before forking: the children start at once)
from fisherstore import open_store
from fisherstore.manifest import TensorSpec
from fisherstore.testing import fisher_like_tensors, tiny_gemma4_config, write_store
from fisherstore.testing.kills import count_writes, kill_points, killed_run, run_kill_trials, same_result
from fisherstore.writer import StoreWriter, plan_groups

ZSTD = ["--compression", "blosc-zstd-bitshuffle"]
_ids = itertools.count()


@pytest.fixture(scope="module")
def source(tmp_path_factory, gemma_bf16):
    return write_store(tmp_path_factory.mktemp("kills") / "src", gemma_bf16, group_size=1)


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory, gemma_bf16):
    """Two Fisher stores of the tiny Gemma-4 (3 and 5 prompts, other values), one layer per group, in one folder."""
    root = tmp_path_factory.mktemp("merge-inputs")
    other = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16, seed=1)
    for name, tensors, n in (("a", gemma_bf16, 3), ("b", other, 5)):
        plan = plan_groups([TensorSpec.of(k, t) for k, t in tensors.items()], 1)
        with StoreWriter.create(root / name, plan, provenance={"num_prompts": n}) as w:
            for g in plan:
                w.write_group(g.index, {s.name: tensors[s.name] for s in g.tensors})
            w.finish()
    return root


def _assert_clean(report, minimum, *, debris=True):
    counts = report.counts()
    assert counts["trials"] >= minimum and counts["killed"] == counts["trials"], report.to_dict()
    bad = {k: counts[k] for k in ("debris_left", "wrong_complete", "mismatches", "source_changed")}
    assert bad == dict.fromkeys(bad, 0), [t for t in report.trials if t.note]
    if debris:
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


def test_object_store_writes_are_fault_points(monkeypatch, gemma_bf16):
    """Every PUT and every completed upload counts as one durable write, once the object exists."""
    from fisherstore import _io
    from fisherstore.manifest import IMPORTANCE_NAME, MANIFEST_NAME
    from fisherstore.storage import resolve

    url = f"memory://kills-faults/{next(_ids)}/s.zarr"
    remote = resolve(url)
    seen = []

    def record(where, *, before):
        if not before:
            seen.append((str(where), remote.fs.exists(remote.key(str(where)[len(url) + 1 :]))))

    monkeypatch.setattr(_io, "_FAULTS", True)
    monkeypatch.setattr(_io, "_fault_point", record)
    write_store(url, gemma_bf16, backend="zarr", group_size=2)
    objects = sorted(str(k)[len(remote.root) + 1 :] for k in remote.fs.find(remote.root))
    assert sorted({w[len(url) + 1 :] for w, _ in seen}) == objects and len(objects) > 10
    assert all(exists for _, exists in seen)  # counted after the object appeared, never before
    assert [w for w, _ in seen].count(f"{url}/{MANIFEST_NAME}") == 3  # the empty plan, then once per group (2)
    assert [w for w, _ in seen[-2:]] == [f"{url}/{IMPORTANCE_NAME}", f"{url}/{MANIFEST_NAME}"]  # manifest last
    remote.rm(recursive=True)


def test_kills_at_the_last_writes_leave_incomplete_or_the_whole_store(merge_inputs, tmp_path):
    """Killed at each of the last writes (importance document, then the final manifest): the store says
    incomplete, or it is complete and equals the uninterrupted run, layer_importance.json included."""
    argv = ["--no-fsync", "merge", merge_inputs / "a", merge_inputs / "b", "-o"]
    writes = count_writes([*argv, tmp_path / "ref" / "out"], tmp_path, fork=True)  # also the reference
    states = []
    for point in range(max(1, writes - 3), writes + 1):
        out = tmp_path / f"out-{point}"
        rc, err = killed_run([*argv, out], point, fork=True)
        assert rc == -signal.SIGKILL, err
        with open_store(out) as store:
            complete = store.complete
        states.append(complete)
        assert not complete or same_result(out, tmp_path / "ref" / "out") == "", point
    assert states[-1] and not states[0]  # the last kill comes after the final manifest, the first before


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
    "merge": ("merged", lambda s, d: ["merge", s / "a", s / "b", "-o", d], "--resume"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(SLOW))
def test_twenty_kill_points_per_long_command(source, merge_inputs, tmp_path, label):
    name, argv, resume = SLOW[label]
    src = merge_inputs if label == "merge" else source
    report = run_kill_trials(
        label,
        lambda d: argv(src, d),
        tmp_path,
        name=name,
        points=20,
        source=None if label == "extract" else src,
        resume_flag=resume,
        env={"OMP_NUM_THREADS": "1"},
        fork=label.startswith(("convert", "merge")),  # no torch op runs in these: forking this process is safe
    )
    print(json.dumps({"label": label, "events": report.events, **report.counts()}))  # the figures, with -s or -rP
    _assert_clean(report, 20)


# -- object-store destinations (a real S3 server: moto behind a proxy, fisherstore.testing.s3) ------------
@pytest.fixture
def bucket(s3):
    name = f"kills-{next(_ids)}"
    s3.make_bucket(name)
    return name


def _s3_argv(label, source, s3_source, opts):
    extract = ["--num-prompts", "2", "--max-length", "16", "--group-size", "1", "--dtype", "fp32"]
    zarr = ["--backend", "zarr"]  # an object per array and shard: >= 20 durable writes (safetensors: 14 for extract)
    return {
        "convert-s3-zarr": lambda d: ["convert", source, "-o", d, "--storage-options", opts],
        "extract-s3": lambda d: ["extract", "tiny-gemma4", "--out", d, *extract, *zarr, "--storage-options", opts],
        "svd-s3": lambda d: ["svd", s3_source, "--rank", "2", "-o", d, *zarr, "--storage-options", opts],
    }[label]


S3_SLOW = {"convert-s3-zarr": "out.zarr", "extract-s3": "fisher", "svd-s3": "masks"}


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(S3_SLOW))
def test_twenty_kill_points_per_s3_command(s3, bucket, source, gemma_bf16, tmp_path, label):
    s3_source = write_store(f"s3://{bucket}/src", gemma_bf16, group_size=1, storage_options=s3.options)
    report = run_kill_trials(
        label,
        _s3_argv(label, source, s3_source, json.dumps(s3.options)),
        tmp_path,
        name=S3_SLOW[label],
        points=20,
        source={"extract-s3": None, "svd-s3": s3_source}.get(label, source),
        resume_flag="--resume",
        env={"OMP_NUM_THREADS": "1"},
        fork=label.startswith("convert"),
        remote=f"s3://{bucket}/kills",
        storage_options=s3.options,
    )
    print(json.dumps({"label": label, "events": report.events, **report.counts()}))
    _assert_clean(report, 20)  # a killed writer leaves its lock object: the rerun takes it over and removes it
    left = s3.client().list_objects_v2(Bucket=bucket, Delimiter="/", Prefix="kills/")["CommonPrefixes"]
    assert [p["Prefix"] for p in left] == ["kills/reference/"]  # every trial's prefix was removed
