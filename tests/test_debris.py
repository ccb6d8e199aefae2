"""Debris: temporary names that record their owner, removal of dead writers' leftovers, info's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fisherstore import info
from fisherstore._guard import find_debris, lock_store, remove_stale
from fisherstore._io import TMP_PREFIX, atomic_dir, atomic_file, parse_tmp_name, this_owner, tmp_name
from fisherstore.testing import write_store


def _dead_owner_name(label: str) -> str:
    """A temporary name of a process that has exited (same host)."""
    proc = subprocess.run(
        [sys.executable, "-c", "from fisherstore._io import tmp_name; import sys; print(tmp_name(sys.argv[1]))", label],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def test_temporary_names_record_their_owner(tmp_path):
    name = tmp_name("store.zarr")
    owner, label = parse_tmp_name(name)
    assert owner == this_owner() and owner.pid == os.getpid() and label == "store.zarr"
    assert name.startswith(TMP_PREFIX) and parse_tmp_name(".fstmp-abc123") is None
    with atomic_dir(tmp_path / "d") as tmp:
        parsed = parse_tmp_name(tmp.name)
        assert parsed is not None and parsed[0] == this_owner() and parsed[1].startswith("d.")
        assert [d.state for d in find_debris(tmp_path / "d")] == ["alive"]  # ours, while we write it
    with atomic_file(tmp_path / "f.pt") as fh:
        [entry] = [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
        assert parse_tmp_name(entry.name)[1].startswith("f.pt.")
        fh.write(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.pt"]


def test_a_rerun_removes_dead_writers_debris_and_keeps_live_and_foreign_ones(
    cli, make_store, gemma_bf16, tmp_path, caplog
):
    src = make_store(gemma_bf16)
    dst = tmp_path / "out"
    dead = tmp_path / (_dead_owner_name("out") + ".k3j2")
    dead.mkdir()
    (dead / "fisher-00001-of-00002.safetensors").write_bytes(b"\0" * 1000)
    me = this_owner()
    foreign = tmp_path / f".fstmp-{me.pid}-{me.token}@another-host~out.x1"
    foreign.write_bytes(b"\0" * 10)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from fisherstore._io import start_token

        live = tmp_path / f".fstmp-{sleeper.pid}-{start_token(sleeper.pid) or '0'}@{me.host}~out.x2"
        live.write_bytes(b"")
        unrelated = tmp_path / (_dead_owner_name("other-store") + ".zz")  # names another destination
        unrelated.write_bytes(b"")
        states = {d.path.name: d.state for d in find_debris(dst)}
        assert states == {dead.name: "dead", foreign.name: "elsewhere", live.name: "alive"}
        code, _, _ = cli("convert", src, "-o", dst)
        assert code == 0
        assert not dead.exists() and foreign.exists() and live.exists() and unrelated.exists()
        assert f"removed {dead}" in caplog.text and "which cannot be checked from here" in caplog.text
        assert "is still running" in caplog.text
        summary = info(dst)
        assert summary["writer"] is None
        assert sorted((d["state"], d["kind"]) for d in summary["debris"]) == [("alive", "temp"), ("elsewhere", "temp")]
        code, out, _ = cli("info", dst)
        assert code == 0 and "debris   2 of writers that may be running (alive, elsewhere; left alone)" in out
        code, out, _ = cli("info", dst, "--json")
        assert len(json.loads(out)["debris"]) == 2
    finally:
        sleeper.kill()
        sleeper.wait()
    # now the sleeper is gone: its leftover is a dead writer's, and --overwrite removes it
    assert cli("convert", src, "-o", dst, "--overwrite")[0] == 0
    assert not live.exists() and foreign.exists()


def test_leftovers_inside_a_store_are_reported_and_removed_by_resume(cli, tmp_path, gemma_bf16):
    path = write_store(tmp_path / "s", gemma_bf16, groups=[0])  # an interrupted store
    leftover = path / f"{TMP_PREFIX}fisher-00002-of-00003.safetensors"  # a backend's temporary: no owner
    leftover.write_bytes(b"\0" * 4096)
    (tmp_path / ".s.fisherstore-lock").write_text(
        json.dumps({"pid": 999999, "host": this_owner().host, "token": "1", "command": "x", "since": "then"})
    )
    summary = info(path)
    assert {(d["kind"], d["state"], d["bytes"]) for d in summary["debris"]} == {
        ("temp", "dead", 4096),
        ("lock", "dead", (tmp_path / ".s.fisherstore-lock").stat().st_size),
    }
    code, out, _ = cli("info", path)
    assert "debris   2 of dead writers (" in out and "the next --resume, --overwrite or rerun removes them" in out
    with lock_store(path) as lock:
        assert [d.path for d in remove_stale(path, lock)] == [leftover]  # held: unowned temporaries are stale
    assert not leftover.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert info(path)["debris"] == []


@pytest.mark.parametrize("target", ["out", "out.zarr", "out.pt"])
def test_a_failed_conversion_leaves_nothing_beside_the_destination(make_store, gemma_bf16, tmp_path, target):
    from fisherstore import convert

    src = make_store(gemma_bf16)
    victim = next(p for p in src.iterdir() if p.suffix == ".safetensors")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's checksum no longer matches: the conversion fails near its end
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bytes hash to"):
        convert(src, tmp_path / target)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("store")) == []


def test_info_on_a_destination_a_killed_run_never_made_names_the_leftovers(cli, tmp_path):
    dead = tmp_path / (_dead_owner_name("out") + ".abcd")
    dead.mkdir()
    code, _, err = cli("info", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"(but 1 leftovers of writers lie beside it: {dead.name}; rerunning" in err
    code, _, err = cli("info", tmp_path / "other")
    assert code == 2 and "leftovers" not in err
