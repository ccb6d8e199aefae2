import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fisherstore import TensorNotFoundError, open_store
from fisherstore._readahead import PIECE_BYTES
from fisherstore._tally import Tally
from fisherstore.errors import BadInputError, StoreNotFoundError

from .conftest import SHARED_SAMPLE


@pytest.fixture
def store(make_store, gemma_bf16):
    with open_store(make_store(gemma_bf16)) as s:
        yield s


def test_metadata(store, gemma_bf16):
    assert store.names == list(gemma_bf16)
    assert store.layers == [0, 1, 2, 3]
    assert store.nbytes == sum(t.numel() * 2 for t in gemma_bf16.values())
    assert "model.layers.1.self_attn.v_proj.weight" not in store
    assert store.shape("model.layers.1.self_attn.q_proj.weight") == (128, 64)
    assert store.shape("model.layers.0.self_attn.q_proj.weight") == (64, 64)


def test_row_reads_dtype_and_device(store, gemma_bf16):
    name = "model.layers.2.mlp.up_proj.weight"
    ref = gemma_bf16[name]
    assert torch.equal(store.read(name, rows=(5, 9)), ref[5:9])
    assert torch.equal(store.read(name, rows=slice(120, None)), ref[120:])
    assert torch.equal(store.read(name, rows=slice(3, 3)), ref[3:3])
    got = store.read(name, dtype=torch.float32, device="cpu")
    assert got.dtype == torch.float32 and torch.equal(got, ref.float())
    blocks = list(store.iter_rows(name, 50))
    assert [s for s, _ in blocks] == [0, 50, 100]
    assert torch.equal(torch.cat([b for _, b in blocks]), ref)
    with pytest.raises(BadInputError, match="out of range"):
        store.read(name, rows=(0, 1000))


@pytest.mark.parametrize(
    "backend,options,chunk,limit,count",
    [
        ("safetensors", {}, 10_000, 10_000, 2),
        ("zarr", {}, 1000, 1000, 17),  # uncompressed zarr in one shard lies raw: byte chunks, like safetensors
        ("zarr", {"compression": "zstd"}, 1000, 1000, 22),  # encoded: blocks of 3 whole 256-byte rows
    ],
)
def test_iter_bytes_bounded_chunks(make_store, gemma_bf16, backend, options, chunk, limit, count):
    """Raw sources stream buffers of at most the chunk size; encoded ones stream row blocks."""
    name = "model.layers.0.mlp.down_proj.weight"  # 64 rows x 256 bytes
    with open_store(make_store(gemma_bf16, backend=backend, **options)) as store:
        sizes, data = [], b""
        for chunk_view in store.iter_bytes(name, piece_bytes=chunk):
            sizes.append(len(chunk_view))
            data += bytes(chunk_view)  # a view is valid only until the next one is asked for
    assert max(sizes) <= limit and len(sizes) == count
    assert data == gemma_bf16[name].view(torch.uint8).numpy().tobytes()


def test_missing_tensor_suggests(store):
    with pytest.raises(TensorNotFoundError, match="did you mean 'model.layers.1.self_attn.q_proj.weight'"):
        store["model.layers.1.self_attn.q_proj.weights"]
    with pytest.raises(KeyError):  # also a KeyError, for dict-like callers
        store["nope"]


def test_plain_safetensors_reads_shards_through_the_index(store, gemma_bf16):
    index = json.loads((store.path / "fisher.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == store.nbytes
    assert set(index["weight_map"]) == set(gemma_bf16)
    for name, file in index["weight_map"].items():
        with safe_open(store.path / file, "pt") as fh:
            assert torch.equal(fh.get_tensor(name), gemma_bf16[name])


def test_layer_importance_matches_fp64(store, gemma_bf16):
    imp = store.layer_importance()
    for layer, value in imp.items():
        assert value == pytest.approx(
            sum(t.double().sum().item() for n, t in gemma_bf16.items() if f"layers.{layer}." in n), rel=1e-6
        )


def test_open_bare_safetensors_file_and_streamed_importance():
    with open_store(SHARED_SAMPLE) as s:
        assert len(s) == 14 and s.layers == [0, 15] and s.format == "safetensors-file"
        name = "model.layers.15.mlp.down_proj.weight"
        with safe_open(SHARED_SAMPLE, "pt") as fh:
            ref = fh.get_tensor(name)
        assert torch.equal(s.read(name, rows=(10, 20)), ref[10:20])
        imp = s.layer_importance()
    assert imp[0] > imp[15] > 0


def test_tally_sum_independent_of_chunking():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(300_001, generator=g).to(torch.bfloat16)
    raw = x.view(torch.uint8).numpy().tobytes()
    whole, pieces = Tally("bfloat16"), Tally("bfloat16")
    whole.update(raw)
    for i in range(0, len(raw), 70_001):
        pieces.update(raw[i : i + 70_001])
    assert whole.sum == pieces.sum
    assert whole.sum == pytest.approx(x.double().sum().item(), rel=1e-6)
    assert whole.checksum.hexdigest() == pieces.checksum.hexdigest()


def _reference_sum(values: torch.Tensor) -> float:
    """The manifest sum by its definition, slowly: fp32 sums of 65536-element blocks added up in fp64.

    Mirrors the order the Tally uses, one run at a time: a whole block is
    summed in runs of 1024 consecutive values (``np.einsum`` of one run) whose
    sums are added pairwise; fp64 additions of 64 block sums at a time; a final
    partial block added last, its odd last element first, then the rest summed
    pairwise.  So the comparison can be exact.
    """
    x = values.float().numpy()
    full = len(x) - len(x) % 65536

    def block(b: np.ndarray) -> np.float32:
        return np.array(
            [np.einsum("i->", b[i : i + 1024].copy()) for i in range(0, len(b), 1024)], dtype=np.float32
        ).sum()

    sums = [block(x[i : i + 65536]) for i in range(0, full, 65536)]
    total = 0.0
    for i in range(0, len(sums), 64):
        total += float(np.array(sums[i : i + 64], dtype=np.float32).sum(dtype=np.float64))
    tail = x[full:]
    if len(tail):
        partial = float(tail[-1]) if len(tail) % 2 else 0.0
        partial += float(tail[: len(tail) - len(tail) % 2].sum(dtype=np.float32))
        total += partial
    return total


@pytest.mark.parametrize("numel", [1, 5, 65536, 65536 * 65 + 4, 65536 * 130 + 7])
def test_tally_bf16_sum_matches_its_definition_exactly(numel):
    g = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=g) * 100).to(torch.bfloat16)
    tally = Tally("bfloat16")
    tally.update(x.view(torch.uint8).numpy().tobytes())
    assert tally.sum == _reference_sum(x)


@pytest.mark.parametrize("piece", [70_001 * 2, PIECE_BYTES, 4_188_160, 3 * 2**20 + 2])
def test_tally_sum_is_bit_identical_however_the_bytes_are_cut(piece):
    """Values spanning ~60 orders of magnitude, so that fp64 additions of block sums round: the grouping of
    blocks must follow the tensor, not the pieces (raw writes use ~1 MiB pieces, compression whole chunks)."""
    g = torch.Generator().manual_seed(7)
    numel = 65536 * 130 + 7
    blocks = torch.randint(-100, 100, (numel // 65536 + 1,), generator=g).repeat_interleave(65536)[:numel]
    x = (torch.rand(numel, generator=g) * torch.exp2(blocks.double())).to(torch.bfloat16)
    raw = x.view(torch.uint8).numpy().tobytes()
    tally = Tally("bfloat16")
    for i in range(0, len(raw), piece):
        tally.update(raw[i : i + piece])
    assert tally.sum == _reference_sum(x)


def test_open_missing(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no such store"):
        open_store(tmp_path / "absent")
    with pytest.raises(StoreNotFoundError, match="without fisherstore.json"):
        open_store(tmp_path)


def test_large_raw_reads_are_private_maps(tmp_path):
    """Reads >= MAP_MIN_BYTES map the file copy-on-write: equal values, writes never reach the file."""
    from fisherstore import StoreWriter, TensorSpec, plan_groups
    from fisherstore.store import MAP_MIN_BYTES

    from .conftest import tree_digest

    name = "model.layers.0.mlp.up_proj.weight"
    t = torch.arange(MAP_MIN_BYTES, dtype=torch.float32).reshape(1024, -1)
    plan = plan_groups([TensorSpec.of(name, t)], 1)
    with StoreWriter.create(tmp_path / "s", plan) as w:
        w.write_group(0, {name: t})
        w.finish()
    before = tree_digest(tmp_path / "s")
    with open_store(tmp_path / "s") as store:
        x = store[name]
        assert torch.equal(x, t) and torch.equal(store.read(name, rows=(512, 1024)), t[512:])
        x.zero_()
        assert torch.equal(store[name], t)
    assert tree_digest(tmp_path / "s") == before
    shard = next((tmp_path / "s").glob("fisher-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-4096])  # truncated: an error, never a SIGBUS
    with open_store(tmp_path / "s") as store, pytest.raises(Exception, match="truncated|file has"):
        store[name]


def test_iter_chunks_is_a_deprecated_alias_of_iter_pieces(store):
    name = store.names[1]
    with pytest.warns(DeprecationWarning, match="iter_pieces"):
        old = list(store.iter_chunks(name, chunk_bytes=1000))
    assert old == list(store.iter_pieces(name, piece_bytes=1000)) and len(old) > 1


class _MemorySource:
    """A tensor source of in-memory tensors: no raw spans; ``read_rows_into`` only when ``decodes`` is set."""

    def __init__(self, tensors: dict[str, torch.Tensor], decodes: bool) -> None:
        from fisherstore.manifest import TensorInfo

        self.tensors = tensors
        self.infos = {n: TensorInfo(n, tuple(t.shape), "bfloat16", 0, {}, "", float("nan")) for n, t in tensors.items()}
        self.decoded: list[tuple[str, int, int]] = []
        self.read_rows_into = self._read_into if decodes else None

    def read_rows(self, info, start, stop):
        return self.tensors[info.name][start:stop]

    def _read_into(self, info, start, stop, out):
        self.decoded.append((info.name, start, stop))
        out[:] = self.tensors[info.name][start:stop].contiguous().view(torch.uint8).numpy().reshape(-1).data

    def byte_span(self, info):
        return None

    def close(self):
        pass


@pytest.mark.parametrize("decodes", [False, True])
def test_byte_streaming_uses_the_capabilities_a_source_declares(tmp_path, decodes):
    from fisherstore.manifest import GroupInfo, Manifest
    from fisherstore.store import FisherStore

    t = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5).to(torch.bfloat16)
    source = _MemorySource({"w": t}, decodes)
    manifest = Manifest(
        backend="memory",
        groups=(GroupInfo(0, (), tuple(i.spec for i in source.infos.values()), complete=True),),
        tensors=source.infos,
    )
    store = FisherStore(tmp_path, manifest, source)
    pieces = [bytes(p) for p in store.iter_bytes("w", piece_bytes=2 * 5 * 2)]  # two rows a piece
    assert b"".join(pieces) == t.view(torch.uint8).numpy().tobytes() and len(pieces) == 3
    assert source.decoded == ([("w", 0, 2), ("w", 2, 4), ("w", 4, 6)] if decodes else [])
