"""fisherstore.testing: fisher_like matches the real Fisher sample; BackendTests is importable and usable.

fisher_like is calibrated against the real Fisher sample: spread, exponent entropy, rank 1, compression.

Benchmarks and tests use fisher_like as a stand-in for real Fisher, so the
properties that decide compression ratios and SVD behaviour must stay close to
the real sample's (shared/data, bf16).  Every figure is size-weighted over
tensors; the synthetic set is one gemma-like layer at a quarter of the linear
size (the bench's 5120/10240 shapes divided by 4) so that the test stays fast.
The bands are far tighter than the gap to the previous, uncalibrated generator
(log2 std 4.6, exponent entropy 4.3 bits, 1.34x), so each assertion can fail.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fisherstore.testing
from fisherstore.errors import BadInputError
from fisherstore.formats import BACKENDS
from fisherstore.formats.base import GroupSink
from fisherstore.formats.safetensors import SafetensorsBackend
from fisherstore.manifest import GroupInfo
from fisherstore.testing import BackendTests, fisher_like
from fisherstore.testing.backend import row_ranges, sample_tensor

from .conftest import SHARED_SAMPLE, write_store

CODEC = "blosc-zstd-bitshuffle"
H, I = 1280, 2560
SHAPES = {
    "self_attn.q_proj": (H, H),
    "self_attn.k_proj": (H // 4, H),
    "self_attn.v_proj": (H // 4, H),
    "self_attn.o_proj": (H, H),
    "mlp.gate_proj": (I, H),
    "mlp.up_proj": (I, H),
    "mlp.down_proj": (H, I),
}


def _exponent_entropy(t: torch.Tensor) -> float:
    """Shannon entropy (bits) of the 8-bit exponent field of bf16 values."""
    bits = t.contiguous().view(torch.int16).numpy().view(np.uint16)
    p = np.bincount(((bits >> 7) & 0xFF).ravel(), minlength=256) / bits.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _rank1_energy(t: torch.Tensor, iters: int = 50) -> float:
    """sigma_1^2 / ||A||_F^2 by power iteration: a lower bound, so ``> 0.8`` below is conservative."""
    a = t.float().reshape(t.shape[0], -1)
    v = torch.full((a.shape[1],), 1 / math.sqrt(a.shape[1]))
    for _ in range(iters):
        u = a @ v
        u /= u.norm()
        v = a.T @ u
        s = v.norm()
        v /= s
    return float(s.double() ** 2 / a.double().square().sum())


def _properties(tensors: dict[str, torch.Tensor], store: Path) -> dict[str, float]:
    n = sum(t.numel() for t in tensors.values())

    def weighted(f) -> float:
        return sum(f(t) * t.numel() for t in tensors.values()) / n

    write_store(store, tensors, backend="zarr", group_size=4, compression=CODEC)  # default chunking
    stored = sum(
        p.stat().st_size for p in store.rglob("*") if p.is_file() and p.name != "zarr.json" and p.parent != store
    )
    return {
        "log2_mean": weighted(lambda t: torch.log2(t.double()).mean().item()),
        "log2_std": weighted(lambda t: torch.log2(t.double()).std().item()),
        "exponent_entropy": weighted(_exponent_entropy),
        "rank1_energy": weighted(_rank1_energy),
        "ratio": 2 * n / stored,
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, float]:
    with safe_open(SHARED_SAMPLE, "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    return _properties(tensors, tmp_path_factory.mktemp("real") / "store")


@pytest.fixture(scope="module")
def synthetic_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.0.{kind}.weight": fisher_like(shape, g) for kind, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, synthetic_tensors) -> dict[str, float]:
    return _properties(synthetic_tensors, tmp_path_factory.mktemp("synthetic") / "store")


def test_values_are_positive_and_finite_in_bf16(synthetic_tensors):
    for name, t in synthetic_tensors.items():
        assert t.dtype == torch.bfloat16
        x = t.float()
        assert torch.isfinite(x).all() and (x > 0).all(), name
        # far inside bf16's normal range (2^-126..2^128), so ~1e9 values (a few more sigmas) stay so too
        assert torch.log2(x).min().item() > -60 and torch.log2(x).max().item() < 0, name


def test_spread_and_exponent_entropy_match_the_real_sample(real, synthetic):
    # real: log2 mean -21.4, log2 std 2.41 (mlp tensors 2.0-2.35), exponent entropy 3.24 bits
    assert synthetic["log2_mean"] == pytest.approx(real["log2_mean"], abs=1.0)
    assert synthetic["log2_std"] == pytest.approx(real["log2_std"], abs=0.25)
    assert synthetic["exponent_entropy"] == pytest.approx(real["exponent_entropy"], abs=0.15)


def test_nearly_rank_one_like_the_real_sample(real, synthetic):
    assert real["rank1_energy"] > 0.8  # 0.89 size-weighted
    assert synthetic["rank1_energy"] > 0.8
    assert synthetic["rank1_energy"] == pytest.approx(real["rank1_energy"], abs=0.07)


def test_compresses_like_the_real_sample(real, synthetic):
    # a zarr store written by fisherstore, default chunking, the same codec: real 1.457x
    assert synthetic["ratio"] == pytest.approx(real["ratio"], abs=0.03)


# -- the backend contract as a class -------------------------------------------------------------------
def test_importing_fisherstore_testing_does_not_import_pytest():
    code = (
        "import sys, fisherstore.testing; print('pytest' in sys.modules, 'fisherstore.testing.backend' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_backend_tests_is_exposed_lazily():
    from fisherstore.testing.backend import BackendTests as defined

    assert BackendTests is defined
    assert "BackendTests" in fisherstore.testing.__all__
    with pytest.raises(AttributeError, match="no attribute 'StoreTests'"):
        fisherstore.testing.StoreTests  # noqa: B018 - the attribute access is the test


def test_row_ranges_are_valid_and_cover_ends_and_empty():
    assert row_ranges(10) == [(0, 0), (0, 1), (0, 10), (1, 9), (3, 5), (5, 5), (9, 10), (10, 10)]
    assert row_ranges(1) == [(0, 0), (0, 1), (1, 1)]
    assert row_ranges(0) == [(0, 0)]


def test_sample_tensor_spans_each_dtype():
    assert sample_tensor((64,), "int64").abs().max().item() > 2**53  # beyond float64's exact integers
    b = sample_tensor((64,), "bool")
    assert b.dtype == torch.bool and 0 < int(b.sum()) < 64
    assert sample_tensor((), "float32").shape == ()
    assert torch.equal(sample_tensor((5, 3), "bfloat16", seed=3), sample_tensor((5, 3), "bfloat16", seed=3))


REFUSED = frozenset({"bool", "int64"})


class NarrowSafetensorsBackend(SafetensorsBackend):
    """A third-party-style backend: safetensors shards that refuse bool and int64 tensors."""

    name = "narrow-safetensors"

    def begin_group(self, group: GroupInfo, num_groups: int) -> GroupSink:
        for spec in group.tensors:
            if spec.dtype in REFUSED:
                raise BadInputError(f"{self.name} cannot hold dtype {spec.dtype} (tensor {spec.name!r})", param="dtype")
        return super().begin_group(group, num_groups)


class TestThirdPartyBackend(BackendTests):
    """BackendTests as a third party runs it: a backend registered by name, options, refused dtypes."""

    backend = "narrow-safetensors"
    backend_options: ClassVar[dict[str, Any] | None] = {"prefix": "narrow"}
    refused_dtypes = REFUSED
    byte_spans = True

    @pytest.fixture(autouse=True)
    def registered(self, monkeypatch):
        monkeypatch.setitem(BACKENDS, self.backend, (__name__, "NarrowSafetensorsBackend"))

    def test_refused_dtypes_are_refused_and_the_rest_written(self, tmp_path):
        with pytest.raises(BadInputError, match="dtype int64"):
            self.check_odd(tmp_path / "a", (2, 2), "int64")
        self.check_odd(tmp_path / "b", (2, 2), "int32")
        assert sorted(p.name for p in (tmp_path / "b").glob("*.safetensors")) == [
            "narrow-00001-of-00002.safetensors",
            "narrow-00002-of-00002.safetensors",
        ]
