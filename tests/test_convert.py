"""Round trips between every pair of formats, bit-exact, bf16 and fp32."""

import itertools

import pytest
import torch

from fisherstore import open_store
from fisherstore.conversion import convert

from .conftest import assert_same_tensors, tree_digest, write_store

FORMATS = {"safetensors": "st", "zarr": "zarr", "pt": "pt"}


def _dst(tmp_path, fmt, tag):
    return tmp_path / (f"{tag}.pt" if fmt == "pt" else f"{tag}.zarr" if fmt == "zarr" else tag)


@pytest.mark.parametrize("first,second", list(itertools.permutations(FORMATS, 2)))
def test_round_trip_every_pair(tmp_path, gemma_tensors, make_store, first, second):
    """store → first → second → safetensors: every hop bit-exact, the source untouched."""
    src = make_store(gemma_tensors)
    before = tree_digest(src)
    a = convert(src, _dst(tmp_path, first, "a"), to=first)
    b = convert(a, _dst(tmp_path, second, "b"), to=second)
    for path in (a, b):
        with open_store(path) as store:
            assert_same_tensors(store, gemma_tensors)
    assert tree_digest(src) == before


@pytest.mark.parametrize("compression", ["zstd", "blosc-zstd-shuffle", "blosc-zstd-bitshuffle"])
def test_compressed_zarr_round_trip(tmp_path, gemma_bf16, make_store, compression):
    src = make_store(gemma_bf16)
    z = convert(src, tmp_path / "c.zarr", backend_options={"compression": compression})
    back = convert(z, tmp_path / "back.pt")
    with open_store(back) as store:
        assert_same_tensors(store, gemma_bf16)


def test_pt_written_loads_with_stock_torch(tmp_path, gemma_tensors, make_store):
    pt = convert(make_store(gemma_tensors), tmp_path / "fisher.pt")
    for kwargs in ({}, {"mmap": True}):
        loaded = torch.load(pt, weights_only=True, **kwargs)
        assert list(loaded) == list(gemma_tensors)
        for name, t in gemma_tensors.items():
            assert torch.equal(loaded[name], t)


def test_stock_torch_save_converts(tmp_path, gemma_tensors):
    pt = tmp_path / "fisher.pt"
    torch.save(gemma_tensors, pt)
    st = convert(pt, tmp_path / "st", group_size=3)
    with open_store(st) as store:
        assert_same_tensors(store, gemma_tensors)
        assert [g.layers for g in store.manifest.groups] == [(0, 1, 2), (3,)]
        for name, t in gemma_tensors.items():  # sums recorded while streaming
            assert store.info(name).sum == pytest.approx(t.double().sum().item(), rel=1e-5)


def test_small_buffers_still_exact(tmp_path, gemma_bf16, make_store):
    src = make_store(gemma_bf16)
    z = convert(src, tmp_path / "z.zarr", buffer_bytes=100)
    with open_store(z) as store:
        assert_same_tensors(store, gemma_bf16)


@pytest.mark.parametrize(
    "target,options",
    [("st", None), ("z.zarr", None), ("zc.zarr", {"compression": "blosc-lz4-bitshuffle"}), ("x.pt", None)],
)
def test_corrupt_source_bytes_are_caught_on_every_path(tmp_path, gemma_bf16, make_store, target, options):
    """A flipped byte in a source shard fails the conversion (raw or compressed target) and leaves no target."""
    from fisherstore.errors import ChecksumMismatchError

    src = make_store(gemma_bf16)
    name = next(iter(gemma_bf16))
    with open_store(src) as store:
        info = store.info(name)
    shard = src / info.location["file"]
    offset = info.location["offsets"][0] + info.nbytes // 2
    with open(shard, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x40]))
    dst = tmp_path / target
    with pytest.raises(ChecksumMismatchError, match=name):
        convert(src, dst, backend_options=options)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fstmp-")] == []


def test_pt_zip_records_carry_valid_crcs(tmp_path, gemma_tensors, make_store):
    """Records streamed from raw spans and from buffers carry the CRC-32 of their bytes (zip tools check it)."""
    import zipfile

    pt = convert(make_store(gemma_tensors), tmp_path / "fisher.pt", buffer_bytes=1000)
    with zipfile.ZipFile(pt) as zf:
        assert zf.testzip() is None
        assert len([n for n in zf.namelist() if "/data/" in n]) == len(gemma_tensors)
    back = convert(pt, tmp_path / "back.pt")
    with zipfile.ZipFile(back) as zf:
        assert zf.testzip() is None
    with open_store(back) as store:
        assert_same_tensors(store, gemma_tensors)


def test_chunk_bytes_is_a_deprecated_alias_of_buffer_bytes(tmp_path, gemma_bf16, make_store):
    src = make_store(gemma_bf16)
    with pytest.warns(DeprecationWarning, match="chunk_bytes is renamed buffer_bytes"):
        z = convert(src, tmp_path / "z.zarr", chunk_bytes=100)
    with open_store(z) as store:
        assert_same_tensors(store, gemma_bf16)


def test_bad_arguments_name_their_parameter(tmp_path, gemma_bf16, make_store):
    from fisherstore.errors import BadInputError, IncompleteStoreError

    src = make_store(gemma_bf16)
    cases = [
        ({"to": "hdf5"}, "to", r"^to='hdf5' is not a target format"),
        ({"buffer_bytes": 1.5}, "buffer_bytes", r"^buffer_bytes must be a positive integer, got 1.5$"),
        ({"to": "pt", "backend_options": {"compression": "zstd"}}, "backend_options", "fisher.pt takes no"),
    ]
    for kwargs, param, pattern in cases:
        with pytest.raises(BadInputError, match=pattern) as exc:
            convert(src, tmp_path / "out", **kwargs)
        assert exc.value.param == param
    with pytest.raises(BadInputError, match="must not be the source or lie inside it") as exc:
        convert(src, src / "inner")
    assert exc.value.param == "dst"
    write_store(tmp_path / "partial", gemma_bf16, groups=[0])  # group 1 never written
    with pytest.raises(IncompleteStoreError, match=r"groups \[1\] are not written"):
        convert(tmp_path / "partial", tmp_path / "out")
