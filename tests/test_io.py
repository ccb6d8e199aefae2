"""Byte spans and the read-ahead thread: the bytes they hand out, their tally, errors, early stops."""

import os
import threading
import time

import numpy as np
import pytest

from fisherstore._io import FileSpan
from fisherstore._readahead import PIECE_BYTES, ReadAhead
from fisherstore._tally import Tally
from fisherstore.errors import CorruptDataError


@pytest.fixture
def source(tmp_path):
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, data


def test_span_views_are_bounded_and_complete(source):
    path, data = source
    span = FileSpan(path, 5, len(data) - 5)
    sizes, got = [], b""
    for view in span.views(piece_bytes=4000):
        sizes.append(len(view))
        got += bytes(view)
    assert got == data[5:] and max(sizes) == 4000 and len(sizes) == 4
    assert len(span) == len(data) - 5


def test_span_past_the_end_of_its_file_is_corrupt(source):
    path, data = source
    span = FileSpan(path, len(data) - 100, 200)
    with pytest.raises(CorruptDataError, match="100 bytes early"):
        list(span.views())


@pytest.fixture
def big_source(tmp_path):
    """A file of 2.5 read-ahead pieces of bf16-like bytes, so pieces, ring reuse and a short tail all occur."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 0x4000, size=(5 * PIECE_BYTES // 2) // 2, dtype=np.uint16).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(b"HEAD" + data)
    return path, data


def _tally_of(data: bytes) -> Tally:
    t = Tally("bfloat16")
    t.update(data)
    return t


@pytest.mark.parametrize("kind", ["span", "buffer", "stable buffer", "mixed"])
def test_read_ahead_hands_out_every_byte_in_order_and_tallies_it(big_source, kind):
    path, data = big_source
    half = len(data) // 2 + 2  # an even split point that is no piece boundary
    chunks = {
        "span": [FileSpan(path, 4, len(data))],
        "buffer": [bytearray(data)],
        "stable buffer": [memoryview(data)],
        "mixed": [FileSpan(path, 4, half), data[half:]],
    }[kind]
    tally = Tally("bfloat16")
    got = bytearray()
    with ReadAhead() as ahead, ahead.feed(chunks, tally, stable=kind == "stable buffer") as feed:
        for piece in feed:
            assert len(piece) <= PIECE_BYTES
            got += piece
    expected = _tally_of(data)
    assert bytes(got) == data
    assert tally.checksum.hexdigest() == expected.checksum.hexdigest() and tally.sum == expected.sum


def test_read_ahead_copies_transient_buffers_and_slices_stable_ones(big_source):
    _, data = big_source
    buf = bytearray(data[:PIECE_BYTES])
    with ReadAhead() as ahead:
        with ahead.feed([buf], None) as feed:
            (piece,) = list(feed)
            buf[:4] = b"XXXX"  # the producer may reuse its buffer: the piece is a copy
            assert bytes(piece[:4]) == data[:4]
        with ahead.feed([buf], None, stable=True) as feed:
            (piece,) = list(feed)
            assert piece.obj is memoryview(buf).obj  # a view of the caller's buffer, no copy


def test_read_ahead_raises_a_truncated_source_in_the_consumer(big_source):
    path, data = big_source
    span = FileSpan(path, 4, len(data) + 1000)
    with (
        ReadAhead() as ahead,
        ahead.feed([span], Tally("bfloat16")) as feed,
        pytest.raises(CorruptDataError, match="1000 bytes early"),
    ):
        for _ in feed:
            pass


def test_read_ahead_stops_when_the_consumer_stops_early_and_runs_the_next_feed(big_source):
    path, data = big_source
    spans = [FileSpan(path, 4, len(data))] * 4  # more pieces than the ring holds: the helper must block
    ahead = ReadAhead()
    feed = ahead.feed(spans, None)
    first = next(iter(feed))
    assert bytes(first[:8]) == data[:8]
    done = threading.Event()
    closer = threading.Thread(target=lambda: (ahead.close(), done.set()))  # closes the unfinished feed first
    closer.start()
    assert done.wait(10), "closing a ReadAhead with a feed blocked on the ring hung"
    closer.join()
    again = ReadAhead()  # and a fresh one works after an abandoned feed
    with again, again.feed([FileSpan(path, 4, 4096)], None) as feed2:
        assert b"".join(bytes(p) for p in feed2) == data[:4096]


def test_read_ahead_runs_one_feed_at_a_time(big_source):
    path, data = big_source
    with ReadAhead() as ahead:
        first = ahead.feed([FileSpan(path, 4, len(data))], None)
        it = iter(first)
        next(it)
        with pytest.raises(RuntimeError, match="one feed at a time"):
            next(iter(ahead.feed([b"x"], None)))
        first.close()
        with ahead.feed([b"abc"], None) as feed:
            assert [bytes(p) for p in feed] == [b"abc"]


@pytest.mark.parametrize("stable", [False, True])
def test_read_ahead_cuts_fixed_pieces_that_stay_valid_while_held(tmp_path, stable):
    """Pieces of ``cut`` bytes across chunk boundaries; each is intact until ``held + 1`` more were asked for."""
    cut, held = PIECE_BYTES + 10, 3  # larger than a tally step, so each piece is filled in two steps
    data = np.random.default_rng(1).integers(0, 0x4000, size=(12 * cut + 500) // 2, dtype=np.uint16).tobytes()
    path = tmp_path / "src.bin"
    path.write_bytes(b"HEAD" + data)
    third = len(data) // 3
    chunks = [memoryview(data)] if stable else [FileSpan(path, 4, third), bytearray(data[third:])]
    pieces: list[memoryview] = []
    tally = Tally("bfloat16")
    with ReadAhead() as ahead, ahead.feed(chunks, tally, stable=stable, cut=cut, held=held) as feed:
        for piece in feed:
            pieces.append(piece)
            time.sleep(0.02)  # let the helper run as far ahead as its free buffers allow
            for i in range(max(0, len(pieces) - 1 - held), len(pieces)):  # the held ones and the new one
                assert bytes(pieces[i]) == data[i * cut : (i + 1) * cut], f"piece {i} changed while held"
    assert [len(p) for p in pieces] == [cut] * (len(data) // cut) + [len(data) % cut]
    expected = _tally_of(data)
    assert tally.checksum.hexdigest() == expected.checksum.hexdigest() and tally.sum == expected.sum


def test_pieces_held_from_one_feed_stay_valid_while_the_next_feed_reads(tmp_path):
    """A consumer finishing one tensor's pieces (compression in flight) while the next tensor is read: the last
    ``held`` pieces of a feed stay intact until ``held + 1`` pieces of the following feeds were asked for,
    even when a later feed asks for smaller pieces or holds none."""
    cut, held = 2 * PIECE_BYTES, 3
    rng = np.random.default_rng(2)
    tensors = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in (5 * cut + 7, 4 * cut, cut // 3)]
    for i, data in enumerate(tensors):
        (tmp_path / f"t{i}").write_bytes(data)
    window: list[tuple[memoryview, bytes]] = []  # (piece, its expected bytes), the newest last
    with ReadAhead() as ahead:
        for i, (data, feed_cut) in enumerate(zip(tensors, (cut, cut, PIECE_BYTES))):
            chunks = [FileSpan(tmp_path / f"t{i}", 0, len(data))]
            with ahead.feed(chunks, None, cut=feed_cut, held=held) as feed:
                for k, piece in enumerate(feed):
                    window = [*window, (piece, data[k * feed_cut : (k + 1) * feed_cut])][-(held + 1) :]
                    time.sleep(0.02)  # let the helper fill every buffer it is allowed to
                    for j, (held_piece, expected) in enumerate(window):
                        assert bytes(held_piece) == expected, f"tensor {i} piece {k}: held piece {j} was overwritten"
        # a feed that holds nothing may take every buffer back at once
        with ahead.feed([FileSpan(tmp_path / "t0", 0, len(tensors[0]))], None, cut=cut) as feed:
            assert b"".join(bytes(p) for p in feed) == tensors[0]


def test_read_ahead_rejects_a_zero_cut():
    with ReadAhead() as ahead, pytest.raises(ValueError, match="cut must be >= 1"):
        ahead.feed([b"abc"], None, cut=0)


def test_checksum_equals_google_crc32c_whatever_the_update_sizes():
    """Updates of 64 KiB or more go through a GIL-free ctypes call into google-crc32c's C library, smaller ones
    through its extension: both must give google-crc32c's own CRC-32C, in any mix and for any buffer type."""
    import google_crc32c

    from fisherstore._io import _GIL_FREE_BYTES, Checksum, _crc32c_extend

    assert _crc32c_extend() is not None  # the GIL-free path exists here (Linux, C build of google-crc32c)
    data = np.random.default_rng(3).integers(0, 256, 3 * _GIL_FREE_BYTES + 5, dtype=np.uint8)
    expected = "crc32c:" + google_crc32c.Checksum(data.tobytes()).digest().hex()
    for cuts in ([len(data)], [1, _GIL_FREE_BYTES - 1, _GIL_FREE_BYTES, 7], [_GIL_FREE_BYTES * 2 + 3, 1]):
        for kind in (bytes, memoryview, np.asarray):
            c, pos = Checksum(), 0
            for n in [*cuts, len(data)]:
                c.update(kind(data[pos : pos + n].tobytes()) if kind is not np.asarray else data[pos : pos + n])
                pos = min(pos + n, len(data))
            assert c.hexdigest() == expected, (cuts, kind)
    assert Checksum().hexdigest() == "crc32c:00000000"


def test_feed_states_the_handshake_it_was_given():
    """Feed.cut and Feed.held are what the consumer asked for, and the pieces keep to them."""
    data = bytes(range(256)) * 8192  # 2 MiB
    cut = PIECE_BYTES // 2
    with ReadAhead() as ahead:
        feed = ahead.feed([data], None, cut=cut, held=2)
        assert (feed.cut, feed.held) == (cut, 2)
        with feed:
            pieces = [bytes(p) for p in feed]
    assert [len(p) for p in pieces] == [cut] * (len(data) // cut) + [len(data) % cut]
    assert b"".join(pieces) == data
