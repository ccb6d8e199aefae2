"""Hostile and broken inputs: one clear line, exit 2, source unchanged, nothing left behind."""

import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .conftest import tree_digest


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(cli, tmp_path: Path, src: Path, dst_name: str, message: str, *extra: str) -> str:
    """Convert ``src`` to ``dst_name`` and assert the refusal contract; return stderr."""
    digest, listing = tree_digest(src), _listing(tmp_path)
    code, out, err = cli("convert", src, tmp_path / dst_name, *extra)
    assert code == 2, (out, err)
    assert err.startswith("fisherstore: error:") and err.count("\n") == 1, err
    assert message in err, err
    assert tree_digest(src) == digest, "the source was modified"
    assert _listing(tmp_path) == listing, "something was written"
    return err


@pytest.fixture
def good_pt(tmp_path, gemma_bf16) -> Path:
    p = tmp_path / "src" / "fisher.pt"
    p.parent.mkdir()
    torch.save(gemma_bf16, p)
    return p


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_fisher_pt(cli, tmp_path, good_pt, keep):
    data = good_pt.read_bytes()
    good_pt.write_bytes(data[: int(len(data) * keep)])
    _refused(cli, tmp_path, good_pt, "out", str(good_pt))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_calling_an_arbitrary_global_is_not_executed(cli, tmp_path, good_pt):
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(good_pt) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist()}
    evil = tmp_path / "src" / "evil.pt"
    with zipfile.ZipFile(evil, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, pickle.dumps({"w": _Evil(marker)}, protocol=2) if name.endswith("data.pkl") else data)
    good_pt.unlink()
    err = _refused(cli, tmp_path, evil, "out", "posix.system")
    assert "refus" in err
    assert not marker.exists(), "the pickle's payload ran"


def _lying_safetensors(path: Path, lie) -> None:
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": torch.ones(4, 8, dtype=torch.bfloat16),
            "model.layers.0.mlp.down_proj.weight": torch.ones(8, 4, dtype=torch.bfloat16),
        },
        str(path),
    )
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    lie(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


LIES = {
    "past-the-end": (lambda h: h["model.layers.0.mlp.up_proj.weight"].update(data_offsets=[0, 10_000]), "spans"),
    "overlap": (lambda h: h["model.layers.0.mlp.up_proj.weight"].update(data_offsets=[0, 64]), "overlaps"),
    "wrong-shape": (lambda h: h["model.layers.0.mlp.up_proj.weight"].update(shape=[4, 9]), "needs"),
    "bad-dtype": (lambda h: h["model.layers.0.mlp.up_proj.weight"].update(dtype="X99"), "unknown dtype"),
    "hostile-name": (lambda h: h.update({"../../x": h.pop("model.layers.0.mlp.up_proj.weight")}), "unsafe tensor name"),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_safetensors_with_a_lying_header(cli, tmp_path, lie):
    src = tmp_path / "src" / "lying.safetensors"
    src.parent.mkdir()
    mutate, message = LIES[lie]
    _lying_safetensors(src, mutate)
    _refused(cli, tmp_path, src, "out.pt", message)


def test_store_shard_with_a_lying_header(cli, tmp_path, make_store, gemma_bf16):
    store = make_store(gemma_bf16)
    shard = sorted(store.glob("fisher-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].replace(b'"BF16"', b'"F16" ', 1)  # same length: a dtype lie
    shard.write_bytes(bytes(raw[:8] + header + raw[8 + n :]))
    _refused(cli, tmp_path, store, "out.pt", "manifest says")


def test_zarr_store_with_a_missing_chunk(cli, tmp_path, make_store, gemma_bf16):
    z = make_store(gemma_bf16, backend="zarr")
    shards = [p for p in (z / "model.layers.2.mlp.up_proj.weight").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert shards
    shards[0].unlink()
    _refused(cli, tmp_path, z, "out.pt", "model.layers.2.mlp.up_proj.weight")
    code, _, verr = cli("verify", z)
    assert code == 1 and "model.layers.2.mlp.up_proj.weight" in verr


def _tamper_manifest(store: Path, tamper) -> None:
    """Rewrite ``store``'s manifest after ``tamper(first_tensor_name, manifest_dict)``."""
    manifest = json.loads((store / "fisherstore.json").read_text())
    tamper(next(iter(manifest["tensors"])), manifest)
    (store / "fisherstore.json").write_text(json.dumps(manifest))


def test_manifest_naming_a_tensor_outside_the_store(cli, tmp_path, make_store, gemma_bf16):
    store = make_store(gemma_bf16)
    _tamper_manifest(store, lambda name, m: m["tensors"].update({"../../x": m["tensors"].pop(name)}))
    _refused(cli, tmp_path, store, "out", "unsafe tensor name '../../x'")
    code, _, err = cli("info", store)
    assert code == 2 and "../../x" in err


def test_manifest_location_escaping_the_store(cli, tmp_path, make_store, gemma_bf16):
    store = make_store(gemma_bf16)
    _tamper_manifest(store, lambda name, m: m["tensors"][name]["location"].update(file="../../etc/passwd"))
    _refused(cli, tmp_path, store, "out.pt", "not a shard name")


@pytest.mark.parametrize(
    "to, reserved",
    [
        (["--to", "safetensors"], "cannot reserve"),
        (["--to", "zarr"], "cannot reserve"),
        (["--to", "zarr", "--compression", "zstd"], ""),
    ],
)
def test_a_disk_too_small_fails_with_one_line_naming_the_file(tmp_path, good_pt, to, reserved):
    """A file-size limit below a shard's size stands in for a full disk: exit 2, one line naming the file, nothing
    left.  Shards of known size are reserved (fallocate) before they are written, so those fail up front."""
    import subprocess
    import sys

    limit = 8 << 10  # below the largest shards of the tiny Gemma set (16 KiB tensors), above what is written first
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from fisherstore.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    digest, listing = tree_digest(good_pt), _listing(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script, "convert", str(good_pt), str(tmp_path / "out"), *to],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("fisherstore: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert reserved in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert "fisher-00001-of-" in proc.stderr or "/model.layers." in proc.stderr, proc.stderr
    assert tree_digest(good_pt) == digest and _listing(tmp_path) == listing


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a numpy warning would print a second line
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_non_finite_or_overflowing_values_are_refused_in_one_line(cli, tmp_path, gemma_bf16, value):
    """NaN, inf, or finite values whose fp32 block sum overflows: one line naming the tensor (no numpy warning)."""
    tensors = dict(gemma_bf16)
    name = sorted(tensors)[3]
    tensors[name] = torch.zeros(520, 256, dtype=torch.bfloat16)  # two whole summing blocks, then a partial one
    tensors[name].view(-1)[:2] = value  # neighbours: an odd and an even position of the first block
    src = tmp_path / "src" / "fisher.pt"
    src.parent.mkdir()
    torch.save(tensors, src)
    _refused(cli, tmp_path, src, "out", f"tensor {name!r} holds non-finite values")
