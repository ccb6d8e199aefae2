"""Integrity on read: ``open_store(..., verify=True)`` and mask loads check each tensor's CRC-32C once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from fisherstore.errors import BadInputError, ChecksumMismatchError, CorruptDataError
from fisherstore.manifest import Manifest
from fisherstore.masks import open_masks, write_masks
from fisherstore.store import open_store
from fisherstore.testing import tiny_gemma4_model
from fisherstore.training import ProjectorConfig, SubspaceProjector

VICTIM = "model.layers.2.mlp.up_proj.weight"  # 128 x 64 in the tiny Gemma-4: several rows, several zarr chunks


def flip_data_byte(store: Path, name: str, at: float = 0.75) -> None:
    """Flip one bit of ``name``'s stored bytes, ``at`` of the way into them (a late row, not the first)."""
    info = Manifest.load(store / "fisherstore.json").tensors[name]
    if "file" in info.location:  # safetensors: the bytes lie raw at the recorded offsets
        path, (begin, end) = store / info.location["file"], info.location["offsets"]
        pos = begin + int((end - begin) * at)
    else:  # uncompressed zarr: the shard starts with the chunks, in row order
        path = next(p for p in (store / info.location["array"]).iterdir() if p.name.startswith("c"))
        pos = int(info.nbytes * at)
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture(params=["safetensors", "zarr"])
def store(request, make_store, gemma_bf16) -> Path:
    options = {"chunk_mb": 1 / 256} if request.param == "zarr" else {}  # 4 KiB chunks: a row read touches a few
    return make_store(gemma_bf16, backend=request.param, **options)


def test_whole_read_of_a_corrupt_tensor_raises_and_names_it(store, gemma_bf16):
    flip_data_byte(store, VICTIM)
    with open_store(store) as plain:  # the default reads without checking: the flipped bit comes back
        assert not plain.verify
        assert not torch.equal(plain[VICTIM], gemma_bf16[VICTIM])
    with open_store(store, verify=True) as s:
        with pytest.raises(ChecksumMismatchError, match=rf"tensor '{VICTIM}': bytes hash to crc32c:[0-9a-f]{{8}}"):
            s.read(VICTIM)
        assert VICTIM not in s.verified  # a failed tensor is checked again next time
        with pytest.raises(ChecksumMismatchError):
            s[VICTIM]
        other = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(s[other], gemma_bf16[other])
        assert s.verified == {other}


def test_row_reads_check_the_whole_tensor_first(store, gemma_bf16):
    flip_data_byte(store, VICTIM, at=0.9)  # the flip is in a late row; the rows read are early ones
    with open_store(store, verify=True) as s:
        with pytest.raises(ChecksumMismatchError, match=VICTIM):
            s.read(VICTIM, rows=(0, 2))
        blocks = s.iter_rows(VICTIM, 8)
        with pytest.raises(ChecksumMismatchError, match=VICTIM):
            next(blocks)  # not one block is served before the whole tensor is checked
        with pytest.raises(ChecksumMismatchError, match=VICTIM):
            next(iter(s.iter_bytes(VICTIM)))
        with pytest.raises(ChecksumMismatchError, match=VICTIM):
            s.iter_pieces(VICTIM)
        assert s.verified == frozenset()
    with open_store(store) as plain:  # unchecked, the same early rows come back (they are intact)
        assert torch.equal(plain.read(VICTIM, rows=(0, 2)), gemma_bf16[VICTIM][:2])


def test_a_tensor_is_checked_once_and_remembered(store, gemma_bf16):
    with open_store(store, verify=True) as s:
        assert torch.equal(s.read(VICTIM, rows=(3, 5)), gemma_bf16[VICTIM][3:5])
        assert s.verified == {VICTIM}
        flip_data_byte(store, VICTIM)  # corrupted after the check: this store does not look again
        blocks = dict(s.iter_rows(VICTIM, 100))
        assert sorted(blocks) == [0, 100]
        s.check(VICTIM)  # remembered: returns at once
    with open_store(store, verify=True) as fresh, pytest.raises(ChecksumMismatchError):
        fresh.check(VICTIM)  # a new store checks again


def test_every_tensor_reads_back_intact_with_verify(store, gemma_bf16):
    with open_store(store, verify=True) as s:
        for name in s.names:
            assert torch.equal(s[name], gemma_bf16[name]), name
        assert s.verified == set(gemma_bf16)


def test_compressed_zarr_row_read_checks_the_decoded_tensor(make_store, gemma_bf16):
    path = make_store(gemma_bf16, backend="zarr", compression="zstd", chunk_mb=1 / 256)
    manifest = Manifest.load(path / "fisherstore.json")
    (path / "fisherstore.json").write_text(
        (path / "fisherstore.json").read_text().replace(manifest.tensors[VICTIM].checksum, "crc32c:00000000")
    )
    with open_store(path, verify=True) as s:
        with pytest.raises(ChecksumMismatchError, match=rf"{VICTIM}.*the manifest says crc32c:00000000"):
            s.read(VICTIM, rows=(0, 1))
        assert torch.equal(
            s.read("model.layers.0.mlp.down_proj.weight", rows=(1, 3)),
            gemma_bf16["model.layers.0.mlp.down_proj.weight"][1:3],
        )


def test_truncated_shard_is_corrupt_data_on_read(make_store, gemma_bf16):
    path = make_store(gemma_bf16)
    info = Manifest.load(path / "fisherstore.json").tensors[VICTIM]
    shard = path / info.location["file"]
    shard.write_bytes(shard.read_bytes()[:-3])
    with open_store(path, verify=True) as s, pytest.raises(CorruptDataError):
        s.read(VICTIM, rows=(0, 1))


def test_sources_without_checksums_warn(tmp_path, gemma_bf16, caplog):
    from safetensors.torch import save_file

    save_file({VICTIM: gemma_bf16[VICTIM]}, tmp_path / "bare.safetensors")
    with (
        caplog.at_level(logging.WARNING, logger="fisherstore.store"),
        open_store(tmp_path / "bare.safetensors", verify=True) as s,
    ):
        assert torch.equal(s.read(VICTIM, rows=(0, 4)), gemma_bf16[VICTIM][:4])
        assert s.verified == {VICTIM}  # its size was checked; there is no checksum to compare
    assert "records no checksums" in caplog.text


# -- mask loads ------------------------------------------------------------------------------------------
@pytest.fixture
def mask_store(tmp_path) -> tuple[Path, str]:
    """A mask store for the tiny Gemma-4's up_proj of layer 0, and its ``.U`` tensor's name."""
    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.up_proj.weight"
    model = tiny_gemma4_model(0)
    w = dict(model.named_parameters())[name]
    m, n = w.shape
    U = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=torch.float64)).Q.float()
    V = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=torch.float64)).Q.float()
    write_masks(tmp_path / "masks", {name: (U, torch.tensor([2.0, 1.0]), V)})
    return tmp_path / "masks", name


def test_open_masks_verifies_by_default(mask_store):
    path, name = mask_store
    flip_data_byte(path, f"{name}.U")
    with open_masks(path) as masks:
        assert masks.store.verify
        with pytest.raises(ChecksumMismatchError, match=rf"{name}\.U"):
            masks.get(name)
    with open_masks(path, verify=False) as masks:  # opting out returns the flipped bytes
        assert masks.get(name)[0].shape == (128, 2)


def test_projector_refuses_a_corrupt_mask_store(mask_store):
    path, name = mask_store
    model = get_peft_model(tiny_gemma4_model(0), LoraConfig(r=4, target_modules=["up_proj"]))
    SubspaceProjector(model, path)  # intact: loads
    flip_data_byte(path, f"{name}.V")
    with pytest.raises(ChecksumMismatchError, match=rf"{name}\.V"):
        SubspaceProjector(model, path)
    SubspaceProjector(model, path, ProjectorConfig(verify=False))  # the caller's choice
    with pytest.raises(BadInputError, match="verify must be True or False"):
        ProjectorConfig(verify="yes")  # type: ignore[arg-type]
