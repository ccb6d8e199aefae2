"""Byte spans: kernel copies, their fallback, and the bytes a span reads back."""

import os

import pytest

from fisherstore._io import FileSpan, copy_span
from fisherstore.errors import CorruptDataError


@pytest.fixture
def source(tmp_path):
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "fallback"])
def test_copy_span_writes_exactly_the_span_at_the_offset(tmp_path, source, monkeypatch, kernel):
    path, data = source
    if not kernel:  # a platform without copy_file_range takes the read + pwrite path
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    dst = tmp_path / "dst.bin"
    fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"H" * 10, 0)
        end = copy_span(FileSpan(path, 77, 9000), fd, 10)
        end = copy_span(FileSpan(path, 0, 0), fd, end)
    finally:
        os.close(fd)
    assert end == 9010
    assert dst.read_bytes() == b"H" * 10 + data[77:9077]


def test_span_views_are_bounded_and_complete(source):
    path, data = source
    span = FileSpan(path, 5, len(data) - 5)
    sizes, got = [], b""
    for view in span.views(chunk_bytes=4000):
        sizes.append(len(view))
        got += bytes(view)
    assert got == data[5:] and max(sizes) == 4000 and len(sizes) == 4
    assert len(span) == len(data) - 5


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "fallback"])
def test_span_past_the_end_of_its_file_is_corrupt(tmp_path, source, monkeypatch, kernel):
    path, data = source
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    span = FileSpan(path, len(data) - 100, 200)
    with pytest.raises(CorruptDataError, match="100 bytes early"):
        list(span.views())
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(CorruptDataError, match="100 bytes early"):
            copy_span(span, fd, 0)
    finally:
        os.close(fd)
