"""One writer at a time: the lock beside a destination, its holder in the error, stale locks, readers unblocked."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fisherstore import StoreLockedError, open_store
from fisherstore._guard import FileLock, Holder, lock_path, lock_store, owner_state, read_holder
from fisherstore._io import Owner, this_owner
from fisherstore.manifest import TensorSpec
from fisherstore.writer import StoreWriter, plan_groups

HOLD = """
import sys
from fisherstore._guard import lock_store
lock = lock_store(sys.argv[1], command="holder-for-test")
print("ready", flush=True)
sys.stdin.read()
lock.release()
"""


@pytest.fixture
def holder():
    """Start a process that holds the lock of a path; yields a function path -> Popen (killed at the end)."""
    procs = []

    def start(path: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _plan(tensors):
    return plan_groups([TensorSpec.of(n, t) for n, t in tensors.items()], 2)


def test_a_second_writer_in_the_same_process_is_refused_and_the_lock_goes_with_close(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16)
    first = StoreWriter.create(tmp_path / "s", plan)
    assert lock_path(tmp_path / "s") == tmp_path / ".s.fisherstore-lock" and lock_path(tmp_path / "s").exists()
    record = read_holder(tmp_path / "s")
    assert record is not None and record.owner == this_owner()
    with pytest.raises(StoreLockedError, match=rf"being written by pid {os.getpid()} on "):
        StoreWriter.create(tmp_path / "s", plan, resume=True)
    with pytest.raises(StoreLockedError):
        StoreWriter.create(tmp_path / "s", plan, overwrite=True)
    first.write_group(0, {s.name: gemma_bf16[s.name] for s in plan[0].tensors})  # the refusals changed nothing
    first.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # the lock file went with close()
    with StoreWriter.create(tmp_path / "s", plan, resume=True) as again:
        assert again.completed_groups == {0}
    assert not lock_path(tmp_path / "s").exists()


def test_a_refused_start_releases_the_lock(tmp_path, gemma_bf16):
    plan = _plan(gemma_bf16)
    StoreWriter.create(tmp_path / "s", plan).close()
    with pytest.raises(ValueError, match="already exists"):
        StoreWriter.create(tmp_path / "s", plan)
    assert not lock_path(tmp_path / "s").exists()
    StoreWriter.create(tmp_path / "s", plan, overwrite=True).close()  # not left locked by the refusal


def test_cli_second_writer_gets_one_line_naming_the_holder_and_readers_are_not_blocked(
    cli, make_store, gemma_bf16, tmp_path, holder
):
    src = make_store(gemma_bf16)
    done = make_store(gemma_bf16)
    proc = holder(done)
    # readers of a complete store never take the lock
    with open_store(done) as store:
        assert torch.equal(store[store.names[0]], gemma_bf16[store.names[0]])
    assert cli("verify", done)[0] == 0
    code, out, _ = cli("info", done)
    assert code == 0 and f"writing  by pid {proc.pid} on {socket.gethostname()[:10]}" in out
    assert "holder-for-test" in out
    code, _, err = cli("convert", src, "-o", done, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"is being written by pid {proc.pid} on " in err and "holder-for-test, since 20" in err
    code, _, err = cli("svd", src, "--rank", "2", "-o", done, "--overwrite")
    assert code == 2 and f"pid {proc.pid}" in err.strip().splitlines()[-1]
    with open_store(done) as store:  # untouched by the refused writers
        assert store.complete and torch.equal(store[store.names[-1]], gemma_bf16[store.names[-1]])


def test_a_dead_holders_lock_is_reported_stale_and_replaced(cli, make_store, gemma_bf16, tmp_path, holder, caplog):
    src = make_store(gemma_bf16)
    dst = tmp_path / "out"
    proc = holder(dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(dst).exists()  # the kernel dropped the flock; the record stays behind
    stale = read_holder(dst)
    assert stale is not None and stale.owner.pid == proc.pid and owner_state(stale.owner) == "dead"
    lock = lock_store(dst)
    assert lock.stale == stale  # taken over, and the dead holder reported
    assert read_holder(dst) is not None and read_holder(dst).owner == this_owner()
    lock.release()
    assert not lock_path(dst).exists()
    proc = holder(dst)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    caplog.clear()
    code, out, err = cli("convert", src, "-o", dst)
    assert code == 0 and f"its lock was left by pid {proc.pid}" in caplog.text and "which is gone" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("store")) == ["out"]


def test_owner_states_pid_reuse_other_hosts_and_zombies(tmp_path):
    me = this_owner()
    assert owner_state(me) == "alive"
    assert owner_state(Owner(me.pid, "ffffffff1", me.host)) == ("dead" if me.token != "0" else "alive")  # reused pid
    assert owner_state(Owner(me.pid, me.token, "some-other-host")) == "elsewhere"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while True:  # exited but not reaped: a zombie holds no files
        try:
            state = Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            state = "Z"
        if state == "Z":
            break
    from fisherstore._io import start_token

    assert owner_state(Owner(zombie.pid, start_token(os.getpid()), me.host)) == "dead"
    zombie.wait()
    assert owner_state(Owner(zombie.pid, me.token, me.host)) == "dead"


def test_unlinked_lock_file_is_not_a_lock(tmp_path):
    """A writer that locked a file its holder had just unlinked retries on the new one: never two holders."""
    first = FileLock(tmp_path / "d")
    fd = os.open(lock_path(tmp_path / "d"), os.O_RDWR)  # opened before the release, like a racing acquirer
    first.release()
    second = FileLock(tmp_path / "d")  # a fresh file
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old, unlinked inode: free, and worthless
    assert os.fstat(fd).st_ino != os.stat(lock_path(tmp_path / "d")).st_ino
    with pytest.raises(StoreLockedError):
        FileLock(tmp_path / "d")
    os.close(fd)
    second.release()


def test_holder_record_round_trips():
    h = Holder(Owner(12, "abc", "h1"), "fisherstore convert a -o b", "2026-01-01T00:00:00Z")
    assert Holder.parse(json.dumps(h.to_dict())) == h
    assert Holder.parse("") is None and Holder.parse("{}") is None and Holder.parse("[1]") is None
    assert str(h) == "pid 12 on h1 (fisherstore convert a -o b, since 2026-01-01T00:00:00Z)"
