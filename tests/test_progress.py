"""Progress bars: a real tqdm bar on a terminal, a NullBar (and no tqdm import) otherwise."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import sys
import termios

import pytest
from tqdm.std import tqdm as std_tqdm

from fisherstore.progress import NullBar, progress, set_quiet


@pytest.fixture
def quiet_reset():
    yield
    set_quiet(False)


@pytest.fixture
def tty():
    """A writable text stream on the slave side of a real pseudo-terminal, and a function returning what reached it.

    The test itself installs it as sys.stderr: pytest's capturing resets sys.stderr between setup and call.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80x24: tqdm draws nothing on 0x0
    stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), encoding="utf-8", write_through=True)
    os.set_blocking(master, False)

    def written() -> str:
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # BlockingIOError: nothing more for now
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    yield stream, written
    stream.close()
    os.close(master)


def test_not_a_tty_gives_a_null_bar_that_walks_the_iterable():
    assert not sys.stderr.isatty()  # pytest captures stderr
    bar = progress([3, 1, 2], desc="x", unit="it")
    assert isinstance(bar, NullBar)
    assert list(bar) == [3, 1, 2]
    assert len(bar) == 3 and bar.total == 3 and bar.disable is True
    gen = progress(i * i for i in range(4))
    assert list(gen) == [0, 1, 4, 9] and gen.total is None


def test_manual_null_bar_as_context_manager():
    with progress(total=10, desc="convert", unit="B", unit_scale=True, unit_divisor=1024) as bar:
        assert isinstance(bar, NullBar)
        assert bar.update(4) is None
        bar.set_postfix(done=1)
        bar.set_description("again")
    assert bar.total == 10 and bar.n == 0  # a disabled tqdm bar does not count either


@pytest.mark.parametrize(
    "make",
    [
        lambda: ([1, 2, 3], {}),
        lambda: (range(5), {}),
        lambda: ((i for i in range(3)), {}),
        lambda: ([], {}),
        lambda: (None, {"total": 7}),
        lambda: (None, {"total": 0}),
        lambda: ([1, 2], {"total": 9, "initial": 2}),
    ],
    ids=["list", "range", "generator", "empty", "manual", "manual-zero", "total+initial"],
)
def test_null_bar_matches_a_disabled_tqdm(make):
    it_a, kwargs = make()
    it_b, _ = make()
    ours, theirs = NullBar(it_a, **kwargs), std_tqdm(it_b, disable=True, **kwargs)
    assert (ours.total, ours.n, ours.disable) == (theirs.total, theirs.n, theirs.disable)
    assert bool(ours) == bool(theirs)
    if hasattr(it_a, "__len__") or kwargs.get("total") is not None:
        assert len(ours) == len(theirs)
    ours.update(3), theirs.update(3)
    assert ours.n == theirs.n
    if it_a is not None:
        assert list(ours) == list(theirs)
    ours.close(), theirs.close()


def test_bool_of_a_bar_without_iterable_or_total_fails_as_in_tqdm():
    with pytest.raises(TypeError):
        bool(std_tqdm(disable=True))
    with pytest.raises(TypeError):
        bool(NullBar())


def test_a_terminal_gets_a_real_bar(tty, monkeypatch, quiet_reset):
    from tqdm.auto import tqdm

    stream, written = tty
    monkeypatch.setattr(sys, "stderr", stream)

    bar = progress(total=100, desc="verify", unit="B")
    assert isinstance(bar, tqdm) and not bar.disable
    bar.update(40)
    bar.refresh()
    assert bar.n == 40
    bar.close()
    monkeypatch.undo()
    out = written()
    assert "verify" in out and "40/100" in out


def test_quiet_silences_even_a_terminal(tty, monkeypatch, quiet_reset):
    stream, written = tty
    monkeypatch.setattr(sys, "stderr", stream)
    set_quiet(True)
    bar = progress(range(3), desc="svd")
    assert isinstance(bar, NullBar) and list(bar) == [0, 1, 2]
    assert written() == ""
    set_quiet(False)
    bar = progress(range(3), desc="svd")
    assert not isinstance(bar, NullBar) and list(bar) == [0, 1, 2]
    monkeypatch.undo()
    assert "svd" in written()
