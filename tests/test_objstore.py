"""Stores on object storage: fsspec URLs, memory:// for the fast unit tests, a real S3 server for the rest.

The S3 tests talk with s3fs to moto running in server mode on 127.0.0.1
(:class:`fisherstore.testing.s3.S3Server`, started once for this module),
through a proxy that records every request on the server side: counts and
bytes asserted here are what crossed the wire.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisherstore import open_store
from fisherstore.conversion import convert
from fisherstore.errors import BadInputError, ChecksumMismatchError, CorruptDataError
from fisherstore.manifest import MANIFEST_NAME, TensorSpec
from fisherstore.masks import open_masks
from fisherstore.models import TINY_GEMMA4
from fisherstore.storage import Remote, resolve
from fisherstore.verification import verify
from fisherstore.writer import StoreWriter, plan_groups

from .conftest import assert_same_tensors, write_store

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

_ids = itertools.count()


# -- resolution: URLs are never local paths ---------------------------------------------------------------
def test_locations_resolve_to_paths_or_remotes(tmp_path):
    assert resolve("runs/fisher") == Path("runs/fisher")
    assert resolve(f"file://{tmp_path}/x") == tmp_path / "x"
    remote = resolve("memory://objstore-unit/a")
    assert isinstance(remote, Remote) and remote.url == "memory://objstore-unit/a" and remote.name == "a"
    with pytest.raises(BadInputError, match=r"dst 's4://b/x': unknown URL scheme 's4'") as err:
        resolve("s4://b/x", param="dst")
    assert err.value.param == "dst"
    with pytest.raises(BadInputError, match=r"gcsfs") as err:  # known to fsspec, its package not installed
        resolve("gs://bucket/x")
    with pytest.raises(BadInputError, match="pathlib collapsed"):
        resolve(Path("s3://bucket/store"))  # Path() made it s3:/bucket/store, a local folder 's3:'
    with pytest.raises(BadInputError, match="not a bucket itself"):
        resolve("s3://bucket")


def test_import_and_local_paths_do_not_import_fsspec(tmp_path, gemma_bf16):
    store = write_store(tmp_path / "s", gemma_bf16)
    code = (
        "import sys, fisherstore; from fisherstore import open_store, info; "
        f"s = open_store({str(store)!r}); s.read(s.names[0]); info({str(store)!r}); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'botocore', 'aiobotocore')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("dst", ["s4://bucket/store", "gs://bucket/store"])
def test_url_destinations_never_become_local_folders(cli, tmp_path, gemma_bf16, monkeypatch, dst):
    pt = tmp_path / "fisher.pt"
    torch.save(gemma_bf16, pt)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("--quiet", "convert", pt, "-o", dst)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "dst" in err or "-o" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher.pt"]  # no ./s4: or ./gs: folder


# -- memory:// (fast) --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "backend,options",
    [
        ("zarr", {}),
        ("zarr", {"compression": "zstd", "chunk_mb": 0.002, "shard_mb": 0.004}),
        ("zarr", {"chunk_mb": 0.002, "shard_mb": 0.004}),
        ("safetensors", {}),
    ],
)
def test_memory_round_trip_rows_and_blocks(gemma_tensors, backend, options):
    url = f"memory://objstore-unit/rt{next(_ids)}"
    write_store(url, gemma_tensors, backend=backend, **options)
    with open_store(url) as store:
        assert store.complete and isinstance(store.path, Remote)
        assert_same_tensors(store, gemma_tensors)
        name = max(store.names, key=lambda n: store.info(n).nbytes)
        rows = store.shape(name)[0]
        got = store.read(name, (3, rows - 2))
        assert torch.equal(got.view(torch.uint8), gemma_tensors[name][3 : rows - 2].view(torch.uint8))
        blocks = list(store.iter_rows(name, 5))  # with the one-block read-ahead
        assert [s for s, _ in blocks] == list(range(0, rows, 5))
        assert torch.equal(torch.cat([b for _, b in blocks]).view(torch.uint8), gemma_tensors[name].view(torch.uint8))
    assert verify(url) == []


def test_memory_interrupted_group_leaves_manifest_true_and_resumes(gemma_bf16):
    url = f"memory://objstore-unit/resume{next(_ids)}"
    specs = [TensorSpec.of(n, t) for n, t in gemma_bf16.items()]
    plan = plan_groups(specs, 2)
    with StoreWriter.create(url, plan, backend="zarr") as w:
        w.write_group(0, {s.name: gemma_bf16[s.name] for s in plan[0].tensors})

        def failing():
            for i, spec in enumerate(plan[1].tensors):
                if i == 2:
                    raise RuntimeError("connection lost")
                yield spec, [bytes(spec.nbytes)]

        with pytest.raises(RuntimeError, match="connection lost"):
            w.stream_group(1, failing())
    remote = resolve(url)
    assert isinstance(remote, Remote)
    manifest = json.loads(remote.cat(MANIFEST_NAME))
    assert [g["complete"] for g in manifest["groups"]] == [True] + [False] * (len(plan) - 1)
    assert not any(remote.exists(s.name) for s in plan[1].tensors)  # the aborted group's objects are gone
    with open_store(url) as store:
        assert not store.complete and sorted(store.names) == sorted(s.name for s in plan[0].tensors)
    with StoreWriter.create(url, plan, backend="zarr", resume=True) as w:
        assert w.completed_groups == {0}
        for g in plan[1:]:
            w.write_group(g.index, {s.name: gemma_bf16[s.name] for s in g.tensors})
        w.finish()
    with open_store(url) as store:
        assert_same_tensors(store, gemma_bf16)


def test_verify_on_read_checks_objects(gemma_bf16):
    """``open_store(url, verify=True)``: a flipped bit in a shard object is a ChecksumMismatchError on first read."""
    url = f"memory://objstore-unit/vor{next(_ids)}"
    write_store(url, gemma_bf16, backend="zarr")
    remote = resolve(url)
    assert isinstance(remote, Remote)
    name = sorted(gemma_bf16)[2]
    key = f"{name}/c.0.0"
    data = bytearray(remote.cat(key))
    data[3] ^= 0x10  # a byte of the first chunk; the shard index (at the end) is intact
    remote.put(key, bytes(data))
    with open_store(url) as store:  # off: the bytes come back unchecked
        assert not torch.equal(store.read(name).view(torch.uint8), gemma_bf16[name].view(torch.uint8))
    with open_store(url, verify=True) as store:
        with pytest.raises(ChecksumMismatchError, match=name):
            store.read(name, (0, 1))
        other = sorted(gemma_bf16)[0]
        assert torch.equal(store.read(other).view(torch.uint8), gemma_bf16[other].view(torch.uint8))
        assert store.verified == {other}


def test_object_reads_are_capped_before_they_are_fetched(gemma_bf16, monkeypatch):
    """``Remote.cat(limit=)`` is one bounded read; the manifest cap holds for object stores (a 1 MiB cap here)."""
    import fisherstore.manifest
    import fisherstore.store

    url = f"memory://objstore-unit/cap{next(_ids)}"
    write_store(url, gemma_bf16)
    remote = resolve(url)
    assert isinstance(remote, Remote)
    raw = remote.cat(MANIFEST_NAME)
    assert remote.cat(MANIFEST_NAME, limit=10) == raw[:10] and remote.cat(MANIFEST_NAME, limit=len(raw) + 9) == raw
    monkeypatch.setattr(fisherstore.manifest, "MAX_MANIFEST_BYTES", 1 << 20)
    monkeypatch.setattr(fisherstore.store, "MAX_MANIFEST_BYTES", 1 << 20)
    remote.put(MANIFEST_NAME, raw + b" " * ((1 << 20) - len(raw)))  # at the cap: still read
    with open_store(url) as store:
        assert store.complete and len(store.names) == len(gemma_bf16)
    remote.put(MANIFEST_NAME, raw + b" " * (1 << 20))
    with pytest.raises(CorruptDataError, match=r"manifest is over the 1 MiB cap"):
        open_store(url)


# -- a real S3 server ---------------------------------------------------------------------------------------
@pytest.fixture
def bucket(s3):
    name = f"objstore-{next(_ids)}"
    s3.make_bucket(name)
    s3.clear()
    return name


def _opts(s3) -> str:
    return json.dumps(s3.options)


def _keys(s3, bucket) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", []))


def test_pt_to_s3_zarr_to_pt_is_bit_exact(cli, s3, bucket, tmp_path, gemma_tensors):
    pt = tmp_path / "fisher.pt"
    torch.save(gemma_tensors, pt)
    url = f"s3://{bucket}/fisher.zarr"
    code, out, err = cli("--quiet", "convert", pt, "-o", url, "--storage-options", _opts(s3))
    assert code == 0, err
    assert f"wrote {url} (zarr)" in out
    back = tmp_path / "back.pt"
    code, _, err = cli("--quiet", "convert", url, "-o", back, "--storage-options", _opts(s3))
    assert code == 0, err
    loaded = torch.load(back, weights_only=True)
    assert_same_tensors(type("S", (), {"names": list(loaded), "__getitem__": lambda _, n: loaded[n]})(), gemma_tensors)
    keys = _keys(s3, bucket)
    assert "fisher.zarr/fisherstore.json" in keys and "fisher.zarr/zarr.json" in keys
    assert not any(Path(k).name.startswith(".fstmp") for k in keys)


def test_manifest_is_put_after_the_objects_it_names(s3, bucket, gemma_bf16):
    url = f"s3://{bucket}/ordered"
    write_store(url, gemma_bf16, backend="zarr", storage_options=s3.options)
    uploaded: set[str] = set()
    checked = 0
    for r in s3.requests:
        key = r.path.removeprefix(f"/{bucket}/ordered/")
        single = r.method == "PUT" and r.status == 200 and "uploadId" not in r.query
        if single or (r.method == "POST" and "uploadId" in r.query):  # a PUT, or a multipart upload completed
            uploaded.add(key)
        if r.method == "PUT" and key == MANIFEST_NAME:
            manifest = json.loads(r.body)  # what this manifest claims complete must already be there
            checked += 1
            for name in manifest["tensors"]:
                assert f"{name}/zarr.json" in uploaded and f"{name}/c.0.0" in uploaded, name
    assert checked >= 3  # the first (empty) manifest, one per group, the final one


def test_one_tensor_read_fetches_only_its_objects_and_ranges(s3, bucket, gemma_bf16):
    url = f"s3://{bucket}/lazy"
    write_store(url, gemma_bf16, backend="zarr", storage_options=s3.options)
    name = max(gemma_bf16, key=lambda n: gemma_bf16[n].nbytes)
    s3.clear()
    with open_store(url, storage_options=s3.options) as store:
        assert torch.equal(store[name].view(torch.uint8), gemma_bf16[name].view(torch.uint8))
    requests = s3.requests
    paths = {r.path.removeprefix(f"/{bucket}/lazy/") for r in requests}
    assert paths == {MANIFEST_NAME, f"{name}/zarr.json", f"{name}/c.0.0"}
    shard = [r for r in requests if r.path.endswith("/c.0.0") and r.method == "GET"]
    assert all(r.range for r in shard)  # range requests only, never a whole-object GET
    data = gemma_bf16[name].nbytes
    assert sum(r.received for r in shard) == data + 16 + 4  # the tensor's bytes and the one-chunk shard index
    assert len(requests) <= 7

    rows = gemma_bf16[name].shape[0]
    s3.clear()
    with open_store(url, storage_options=s3.options) as store:
        part = store.read(name, (rows // 2, rows // 2 + 3))
    assert torch.equal(part.view(torch.uint8), gemma_bf16[name][rows // 2 : rows // 2 + 3].view(torch.uint8))
    row_bytes = data // rows
    got = [r for r in s3.requests if r.path.endswith("/c.0.0") and r.method == "GET"]
    assert [r.received for r in got] == [20, 3 * row_bytes]  # index, then exactly the three rows


def test_safetensors_store_and_bare_file_read_by_ranges(s3, bucket, gemma_bf16, tmp_path):
    url = f"s3://{bucket}/st"
    write_store(url, gemma_bf16, backend="safetensors", storage_options=s3.options)
    name = max(gemma_bf16, key=lambda n: gemma_bf16[n].nbytes)
    s3.clear()
    with open_store(url, storage_options=s3.options) as store:
        assert torch.equal(store[name].view(torch.uint8), gemma_bf16[name].view(torch.uint8))
        shard = store.info(name).location["file"]
    gets = [r for r in s3.requests if r.method == "GET" and r.path.endswith(shard)]
    size = s3.client().head_object(Bucket=bucket, Key=f"st/{shard}")["ContentLength"]
    assert all(r.range for r in gets) and gets[-1].received == gemma_bf16[name].nbytes
    assert sum(r.received for r in gets) < size  # header, then the tensor: not the shard
    from safetensors.torch import save_file

    save_file({n: gemma_bf16[n] for n in list(gemma_bf16)[:4]}, tmp_path / "f.safetensors")
    s3.client().upload_file(str(tmp_path / "f.safetensors"), bucket, "bare/f.safetensors")
    with open_store(f"s3://{bucket}/bare/f.safetensors", storage_options=s3.options) as store:
        assert store.format == "safetensors-file"
        assert_same_tensors(store, {n: gemma_bf16[n] for n in list(gemma_bf16)[:4]})


def test_large_shards_upload_in_bounded_parts(s3, bucket):
    big = {"model.layers.0.mlp.down_proj.weight": torch.arange(5 << 20, dtype=torch.float32).reshape(5 << 10, 1024)}
    url = f"s3://{bucket}/big"
    write_store(url, big, backend="zarr", storage_options=s3.options)  # one 20 MiB shard
    parts = [r for r in s3.requests if r.method == "PUT" and "partNumber" in r.query]
    assert len(parts) >= 3 and max(r.sent for r in parts) <= (8 << 20) + (1 << 20)
    assert sum(r.sent for r in parts) == (20 << 20) + 16 * 5 + 4  # 5 chunks of 4 MiB and the index
    with open_store(url, storage_options=s3.options) as store:
        assert_same_tensors(store, big)


def test_extract_straight_into_s3_then_svd_info_verify(cli, s3, bucket, tmp_path):
    url = f"s3://{bucket}/fisher"
    opts = _opts(s3)
    code, out, err = cli(
        "--quiet",
        "extract",
        TINY_GEMMA4,
        "--out",
        url,
        "--num-prompts",
        "2",
        "--max-length",
        "16",
        "--group-size",
        "2",
        "--backend",
        "zarr",
        "--storage-options",
        opts,
    )
    assert code == 0, err
    code, out, err = cli("info", url, "--json", "--storage-options", opts)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["complete"] and summary["format"] == "zarr" and summary["path"] == url
    assert cli("verify", url, "--storage-options", opts)[0] == 0
    code, out, err = cli("--quiet", "importance", url, "--json", "--storage-options", opts)
    assert code == 0 and json.loads(out)["layers"], err
    masks = f"s3://{bucket}/masks"
    code, out, err = cli(
        "--quiet", "svd", url, "--rank", "2", "--out", masks, "--tensors", "q_proj", "--storage-options", opts
    )
    assert code == 0, err
    with open_masks(masks, storage_options=s3.options) as m, open_store(url, storage_options=s3.options) as f:
        name = m.names[0]
        U, S, V = m.get(name, 2)
        assert U.shape[0] == f.shape(name)[0] and V.shape[0] == f.shape(name)[1] and S.shape == (2,)
        assert bool((S[:-1] >= S[1:]).all()) and float(S[0]) > 0


def test_verify_catches_a_corrupted_object(cli, s3, bucket, gemma_bf16):
    url = f"s3://{bucket}/corrupt"
    write_store(url, gemma_bf16, backend="zarr", storage_options=s3.options)
    name = sorted(gemma_bf16)[3]
    key = f"corrupt/{name}/c.0.0"
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[5] ^= 0x40  # one bit of the tensor's bytes; the shard index stays intact
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    code, _, err = cli("--quiet", "verify", url, "--storage-options", _opts(s3))
    assert code == 1
    bad = [line for line in err.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and name in bad[0] and "checksum mismatch" in bad[0], err
    key = "corrupt/fisherstore.json"  # the manifest PUT by the writer records its digest; verify checks it there too
    doc = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert doc["digest"].startswith("sha256:")
    doc["tensors"][name]["sum"] *= 1.5  # still a valid manifest: only the digest can tell
    client.put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode())
    code, _, err = cli("--quiet", "verify", url, "--storage-options", _opts(s3))
    assert code == 1 and "changed after it was written" in err, err


def _one_line_exit_2(result) -> str:
    code, _, err = result
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_refusals_are_one_line_and_leave_nothing(cli, s3, bucket, tmp_path, gemma_bf16, monkeypatch):
    pt = tmp_path / "fisher.pt"
    torch.save(gemma_bf16, pt)
    monkeypatch.chdir(tmp_path)
    err = _one_line_exit_2(cli("convert", pt, "-o", "s3://no-such-bucket-x/s", "--storage-options", _opts(s3)))
    assert "s3://no-such-bucket-x/s" in err and "bucket does not exist" in err
    denied = json.dumps(s3.options_of(s3.denied_key, s3.denied_secret))
    err = _one_line_exit_2(cli("convert", pt, "-o", f"s3://{bucket}/d", "--storage-options", denied))
    assert "permission denied" in err
    wrong = json.dumps(s3.options_of("AKIANOSUCHKEY0000000", "wrong"))
    err = _one_line_exit_2(cli("info", f"s3://{bucket}/d", "--storage-options", wrong))
    assert "permission denied" in err
    err = _one_line_exit_2(cli("info", f"s3://{bucket}/nothing-here", "--storage-options", _opts(s3)))
    assert "no such store" in err
    err = _one_line_exit_2(cli("convert", pt, "-o", f"s3://{bucket}/x", "--storage-options", "[1]"))
    assert "--storage-options must be a JSON object" in err
    assert _keys(s3, bucket) == []  # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher.pt"]  # and never a local ./s3: folder
    write_store(f"s3://{bucket}/taken", gemma_bf16, storage_options=s3.options)
    err = _one_line_exit_2(cli("convert", pt, "-o", f"s3://{bucket}/taken", "--storage-options", _opts(s3)))
    assert "--overwrite" in err


def test_environment_configures_s3_and_missing_credentials_fail_in_one_line(s3, bucket, gemma_bf16):
    url = f"s3://{bucket}/env"
    write_store(url, gemma_bf16, storage_options=s3.options)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    base |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    base |= {"AWS_EC2_METADATA_DISABLED": "true"}
    cmd = [sys.executable, "-m", "fisherstore.cli.main", "info", url, "--json"]
    ok = subprocess.run(cmd, env={**base, **s3.env}, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tensors"] == len(gemma_bf16)
    env = {**base, "FSSPEC_S3_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "no credentials" in bad.stderr and "--storage-options" in bad.stderr


def test_interrupted_s3_conversion_resumes(s3, bucket, tmp_path, gemma_bf16):
    url = f"s3://{bucket}/resumed"
    src = write_store(tmp_path / "src", gemma_bf16, backend="zarr")
    store = open_store(src)
    plan = store.manifest.groups
    with StoreWriter.create(url, plan, backend="zarr", storage_options=s3.options) as w:  # a run killed after group 0
        w.write_group(0, {s.name: store[s.name] for s in plan[0].tensors})
    store.close()
    with pytest.raises(BadInputError, match="already exists"):
        convert(src, url, to="zarr", storage_options=s3.options)
    s3.clear()
    convert(src, url, to="zarr", resume=True, storage_options=s3.options)
    rewritten = {r.path.split("/")[3] for r in s3.requests if r.method == "PUT" and r.path.count("/") >= 4}
    assert not rewritten & {s.name for s in plan[0].tensors}  # group 0 was not uploaded again
    with open_store(url, storage_options=s3.options) as done:
        assert done.complete
        assert_same_tensors(done, gemma_bf16)


def test_corrupt_index_on_s3_is_corrupt_data(s3, bucket, gemma_bf16):
    url = f"s3://{bucket}/badindex"
    write_store(url, gemma_bf16, backend="zarr", storage_options=s3.options)
    name = sorted(gemma_bf16)[0]
    s3.client().put_object(Bucket=bucket, Key=f"badindex/{name}/c.0.0", Body=b"short")
    with open_store(url, storage_options=s3.options) as store, pytest.raises(CorruptDataError, match=name):
        store.read(name)


# -- one writer at a time on S3: a lock object with a lease --------------------------------------------------
_HOLDER = r"""
import json, sys, time, torch
from fisherstore.writer import StoreWriter, plan_groups
from fisherstore.manifest import TensorSpec
t = {"model.layers.0.mlp.down_proj.weight": torch.ones(4, 4)}
plan = plan_groups([TensorSpec.of(n, v) for n, v in t.items()], 1)
w = StoreWriter.create(sys.argv[1], plan, backend="zarr", storage_options=json.loads(sys.argv[2]))
print("held", flush=True)
sys.stdin.readline()  # the test stops, resumes or kills this process meanwhile
try:
    w.write_group(0, t)
    w.finish()
    print("committed", flush=True)
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
"""


def _holder(s3, url: str, lease: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, _opts(s3)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "FISHERSTORE_LOCK_LEASE": lease},
    )
    assert child.stdout is not None and child.stdout.readline() == "held\n"
    return child


def test_s3_lock_one_writer_at_a_time_readers_unblocked(cli, s3, bucket, gemma_bf16):
    from fisherstore._guard import ObjectLock, lock_store
    from fisherstore.errors import StoreLockedError

    url = f"s3://{bucket}/locked"
    write_store(url, gemma_bf16, backend="zarr", storage_options=s3.options)
    assert ".locked.fisherstore-lock" not in _keys(s3, bucket)  # released when the writer finished
    lock = lock_store(resolve(url, s3.options), command="test holder")
    assert isinstance(lock, ObjectLock) and lock.held and lock.stale is None
    record = json.loads(s3.client().get_object(Bucket=bucket, Key=".locked.fisherstore-lock")["Body"].read())
    assert record["pid"] == os.getpid() and record["command"] == "test holder" and record["lease_seconds"] == 60
    child = _holder(s3, f"s3://{bucket}/other", lease="60")
    try:  # a holder's command line is recorded without its storage options (credentials)
        other = json.loads(s3.client().get_object(Bucket=bucket, Key=".other.fisherstore-lock")["Body"].read())
        assert s3.options["secret"] not in other["command"] and other["command"].endswith(f"s3://{bucket}/other …")
    finally:
        child.kill()
        child.wait()
    with pytest.raises(StoreLockedError, match=rf"being written by pid {os.getpid()} .*\(test holder"):
        lock_store(resolve(url, s3.options))
    code, _, err = cli("--quiet", "convert", url, "-o", url, "--overwrite", "--storage-options", _opts(s3))
    assert code == 2 and err.count("\n") == 1, err  # refused before anything is written
    with open_store(url, storage_options=s3.options) as store:  # a reader of the complete store is not blocked
        assert store.complete
        assert_same_tensors(store, gemma_bf16)
    code, out, err = cli("info", url, "--storage-options", _opts(s3))
    assert code == 0 and f"writing  by pid {os.getpid()} " in out and "(test holder, since" in out, (out, err)
    lock.release()
    assert ".locked.fisherstore-lock" not in _keys(s3, bucket) and not lock.held
    with lock_store(resolve(url, s3.options)) as again:
        assert again.held and again.stale is None
    code, out, _ = cli("info", url, "--storage-options", _opts(s3))
    assert code == 0 and "writing" not in out


def test_s3_lock_of_a_killed_writer_is_reported_and_taken_over(s3, bucket, caplog):
    from fisherstore._guard import lock_store
    from fisherstore.errors import StoreLockedError

    url = f"s3://{bucket}/killed"
    child = _holder(s3, url, lease="1")
    try:
        import time

        time.sleep(1.6)  # past the lease: the holder's thread renewed it meanwhile
        with pytest.raises(StoreLockedError, match=rf"pid {child.pid} .*renewed [01] s ago \(lease 1 s\)"):
            lock_store(resolve(url, s3.options))
    finally:
        child.kill()
        child.wait()
    with caplog.at_level("WARNING", logger="fisherstore"), lock_store(resolve(url, s3.options)) as lock:
        assert lock.stale is not None and lock.stale.owner.pid == child.pid  # same host, process gone: at once
    assert any("which is gone" in r.getMessage() for r in caplog.records)


def test_s3_frozen_writer_loses_its_lock_and_does_not_commit(s3, bucket, caplog):
    import signal
    import time

    from fisherstore._guard import lock_store

    url = f"s3://{bucket}/frozen"
    child = _holder(s3, url, lease="1")
    try:
        child.send_signal(signal.SIGSTOP)  # alive but silent: only the lease can tell
        time.sleep(2.5)  # the server's clock counts whole seconds
        with caplog.at_level("WARNING", logger="fisherstore"), lock_store(resolve(url, s3.options)) as lock:
            assert lock.stale is not None and lock.stale.owner.pid == child.pid
            assert any("has not renewed it" in r.getMessage() for r in caplog.records)
            child.send_signal(signal.SIGCONT)
            time.sleep(0.8)  # its next renewal finds another writer's ETag
            out, _ = child.communicate("go\n", timeout=60)
            assert lock.held  # the new writer keeps it
    finally:
        child.kill()
        child.wait()
    assert out.strip().startswith("StoreLockedError") and "lost its lock" in out, out
    assert MANIFEST_NAME not in {k.rsplit("/", 1)[-1] for k in _keys(s3, bucket) if k.startswith("frozen/")} or (
        json.loads(s3.client().get_object(Bucket=bucket, Key=f"frozen/{MANIFEST_NAME}")["Body"].read())["groups"][0][
            "complete"
        ]
        is False
    )


def test_merge_of_s3_stores_into_s3_equals_the_local_merge(cli, s3, bucket, tmp_path, gemma_bf16):
    from fisherstore.merging import merge_stores
    from fisherstore.testing.synthetic import fisher_like_tensors, tiny_gemma4_config

    other = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16, seed=1)
    plan = plan_groups([TensorSpec.of(k, t) for k, t in gemma_bf16.items()], 2)
    for name, tensors, n in (("a", gemma_bf16, 3), ("b", other, 5)):
        for where, opts in ((f"s3://{bucket}/{name}", s3.options), (tmp_path / name, None)):
            with StoreWriter.create(
                where, plan, backend="zarr", provenance={"num_prompts": n}, storage_options=opts
            ) as w:
                for g in plan:
                    w.write_group(g.index, {s.name: tensors[s.name] for s in g.tensors})
                w.finish()
    local = merge_stores([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    url = f"s3://{bucket}/merged"
    code, out, err = cli(
        "--quiet", "merge", f"s3://{bucket}/a", f"s3://{bucket}/b", "-o", url, "--storage-options", _opts(s3)
    )
    assert code == 0, err
    assert f"wrote {url} (zarr)" in out and "8 prompts (3 + 5)" in out
    with open_store(url, storage_options=s3.options) as got, open_store(local.store) as want:
        assert got.complete and got.manifest.provenance["num_prompts"] == 8
        assert [e["path"] for e in got.manifest.provenance["merged_from"]] == [f"s3://{bucket}/a", f"s3://{bucket}/b"]
        assert_same_tensors(got, {n: want[n] for n in want.names})
    assert verify(url, storage_options=s3.options) == []
    code, _, err = cli(
        "merge", f"s3://{bucket}/a", f"s3://{bucket}/b", "-o", f"s3://{bucket}/a/x", "--storage-options", _opts(s3)
    )
    assert code == 2 and "must not be an input or lie inside one" in err and err.count("\n") == 1
