"""Full and read-only destinations: one line, exit 2, nothing that claims completeness, no temporaries left.

As root, a real small tmpfs (and a read-only one, since root ignores chmod); otherwise (and always, too)
the same failure injected at the writer's one write seam (``fisherstore._io`` fault points).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fisherstore import _io
from fisherstore.models import TINY_GEMMA4
from fisherstore.testing import fisher_like_tensors, tiny_gemma4_config, write_store


def _mount(where: Path, options: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped elsewhere: the injected tests cover it)."""
    where = tmp_path / "small"
    if not _mount(where, "size=256k"):
        pytest.skip("needs root and tmpfs mounts (the injected-failure tests run instead)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only folder: a read-only tmpfs as root (chmod does not stop root), else chmod 555."""
    where = tmp_path / "ro"
    if _mount(where, "ro,size=64k"):
        yield where
        subprocess.run(["umount", "-l", str(where)], check=False)
        return
    where.chmod(0o555)
    yield where
    where.chmod(0o755)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A store of ~1.3 MB (fp32, tiny Gemma-4 shapes x2 rows), larger than the small disk."""
    tensors = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.float32)
    tensors = {n: torch.cat([t, t]) if t.dim() else t for n, t in tensors.items()}
    return write_store(tmp_path_factory.mktemp("src") / "src", tensors, group_size=1)


def _claims_complete(folder: Path) -> list[str]:
    """Manifests under ``folder`` that say complete."""
    found = []
    for m in folder.rglob("fisherstore.json"):
        with contextlib.suppress(ValueError):
            if json.loads(m.read_text()).get("complete"):
                found.append(str(m))
    return found


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith((".fstmp-", ".")))


@pytest.mark.parametrize("target", ["out", "out.zarr"])
def test_convert_onto_a_full_disk(cli, small_disk, big_source, target):
    code, _, err = cli("convert", big_source, "-o", small_disk / target)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"fisherstore: error: no space left on device writing {small_disk}/")
    assert "bytes free there: free space or choose another --out" in lines[0]
    assert list(small_disk.iterdir()) == []  # no temporary directory, no lock file, no partial store


def test_extract_onto_a_full_disk(cli, small_disk):
    out = small_disk / "fisher"
    code, _, err = cli(
        "extract", TINY_GEMMA4, "--out", out, "--num-prompts", "1", "--max-length", "8", "--dtype", "fp32"
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no space left on device writing" in lines[0], err
    assert _claims_complete(small_disk) == [] and _leftovers(small_disk) == []  # an incomplete store at most
    if out.exists():
        assert json.loads((out / "fisherstore.json").read_text())["complete"] is False


@pytest.mark.parametrize("after", [1, 5, 20])
@pytest.mark.parametrize("target", ["out", "out.zarr"])
def test_injected_full_disk_during_convert(cli, big_source, tmp_path, monkeypatch, target, after):
    monkeypatch.setattr(_io, "_ENOSPC_AFTER", after)
    monkeypatch.setattr(_io, "_FAULTS", True)
    dest = tmp_path / "dest"
    code, _, err = cli("convert", big_source, "-o", dest / target)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fisherstore: error: no space left on device"), err
    assert os.listdir(dest) == []


def test_injected_full_disk_during_svd_leaves_an_incomplete_mask_store(cli, big_source, tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_ENOSPC_AFTER", 12)
    monkeypatch.setattr(_io, "_FAULTS", True)
    code, _, err = cli("svd", big_source, "--rank", "2", "-o", tmp_path / "masks")
    assert code == 2 and "no space left on device writing" in err.strip().splitlines()[-1]
    assert _claims_complete(tmp_path) == [] and _leftovers(tmp_path) == []
    monkeypatch.setattr(_io, "_ENOSPC_AFTER", 0)
    assert cli("svd", big_source, "--rank", "2", "-o", tmp_path / "masks", "--resume")[0] == 0
    assert len(_claims_complete(tmp_path)) == 1


@pytest.mark.parametrize("target", ["out", "out.zarr", "out.pt"])
def test_read_only_destination(cli, read_only_dir, big_source, target):
    code, _, err = cli("convert", big_source, "-o", read_only_dir / target)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"{read_only_dir / target}" in lines[0]
    assert "read-only file system" in lines[0] or "permission denied" in lines[0]
    assert "choose another --out" in lines[0]
    assert list(read_only_dir.iterdir()) == []
