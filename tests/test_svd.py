import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fisherstore import BadInputError, open_store
from fisherstore.cli import cmd_svd
from fisherstore.cli._common import format_mask_table
from fisherstore.manifest import Manifest
from fisherstore.masks import open_masks, source_identity
from fisherstore.svd import SVDConfig, decompose, decompose_tensor, plan_decomposition, svd_store
from fisherstore.testing import fisher_like

from .conftest import SHARED_SAMPLE, write_store

# The `fisherstore svd` command as a child process: this module's parser, peak RSS on stderr.
DRIVER = """\
import argparse, logging, resource, sys
from fisherstore.cli import cmd_svd
from fisherstore.cli._common import format_mask_table
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
p = argparse.ArgumentParser()
cmd_svd.register(p.add_subparsers())
a = p.parse_args(sys.argv[1:])
code = a.func(a)
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""
BASELINE = (
    "import resource, sys, torch, fisherstore.svd, fisherstore.cli.cmd_svd; "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
)


def _max_orthogonality_error(x: torch.Tensor) -> float:
    x = x.double()
    return (x.T @ x - torch.eye(x.shape[1], dtype=torch.float64)).abs().max().item()


def _residual(a: torch.Tensor, r) -> float:
    return torch.linalg.matrix_norm(a.double() - (r.U.double() * r.S.double()) @ r.V.double().T).item()


def _optimal(singular_values: torch.Tensor, k: int) -> float:
    return singular_values[k:].double().square().sum().sqrt().item()


def _low_rank_plus_noise(m, n, r, noise, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, r, generator=g) @ torch.diag(torch.logspace(0, -2, r)) @ torch.randn(r, n, generator=g)
    return low / low.norm() + noise * torch.randn(m, n, generator=g) / (m * n) ** 0.5


def _svd_cli(*args) -> int:
    parser = argparse.ArgumentParser()
    cmd_svd.register(parser.add_subparsers())
    ns = parser.parse_args([str(a) for a in args])
    return ns.func(ns)


def _child(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True, timeout=600, **kwargs
    )


def _same_masks(a, b, exact=True) -> None:
    with open_masks(a) as x, open_masks(b) as y:
        assert x.names == y.names
        for name in x.names:
            for s, t in zip(x.get(name), y.get(name)):
                if exact:
                    assert torch.equal(s, t), name
                else:
                    assert torch.allclose(s, t, rtol=1e-4, atol=1e-4 * s.abs().max().item()), name
            assert (
                x.attrs(name) == y.attrs(name) if exact else x.energy(name) == pytest.approx(y.energy(name), rel=1e-6)
            )


# -- accuracy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    with open_store(SHARED_SAMPLE) as s:
        tensors = {n: s[n].float() for n in s.names}
    return tensors, {n: torch.linalg.svdvals(t) for n, t in tensors.items()}


@pytest.mark.parametrize("k", [32, pytest.param(8, marks=pytest.mark.slow), pytest.param(64, marks=pytest.mark.slow)])
def test_accuracy_on_the_real_fisher_sample(sample, k):
    """Default parameters, read through the store with a 4 MiB budget (the MLP tensors stream)."""
    tensors, svals = sample
    methods = set()
    with open_store(SHARED_SAMPLE) as store:
        for name, a in tensors.items():
            r = decompose_tensor(store, name, SVDConfig(rank=k, max_memory=4 << 20))
            methods.add((r.method, r.in_memory))
            assert _residual(a, r) <= 1.02 * _optimal(svals[name], k), name
            assert _max_orthogonality_error(r.U) <= 1e-5 and _max_orthogonality_error(r.V) <= 1e-5, name
            assert r.U.shape == (a.shape[0], k) and r.S.shape == (k,) and r.V.shape == (a.shape[1], k)
            assert r.energy == pytest.approx(
                svals[name][:k].square().sum().item() / svals[name].square().sum().item(), rel=1e-3
            )
    assert ("randomized", False) in methods  # some tensors really were streamed


@pytest.mark.parametrize(
    ("m", "n", "r", "noise", "k"),
    [
        (800, 600, 10, 1e-2, 10),
        (800, 600, 10, 1e-2, 20),
        (2000, 400, 50, 1e-1, 25),
        (500, 2000, 30, 1e-3, 60),
        (768, 768, 48, 0.3, 48),
    ],
)
def test_accuracy_on_low_rank_plus_noise(m, n, r, noise, k):
    a = _low_rank_plus_noise(m, n, r, noise)
    result = decompose(a, SVDConfig(rank=k))
    assert result.method == "randomized"
    assert _residual(a, result) <= 1.02 * _optimal(torch.linalg.svdvals(a), k)
    assert _max_orthogonality_error(result.U) <= 1e-5 and _max_orthogonality_error(result.V) <= 1e-5


def test_streamed_equals_in_memory():
    a = fisher_like((1536, 576), torch.Generator().manual_seed(3), torch.bfloat16)
    kept = decompose(a, SVDConfig(rank=16))
    streamed = decompose(a, SVDConfig(rank=16, max_memory=1 << 20))
    assert (kept.in_memory, kept.passes) == (True, 1)
    assert (streamed.in_memory, streamed.passes) == (False, 6)
    assert torch.allclose(kept.S, streamed.S, rtol=1e-5)
    # same subspace: leading vectors agree in sign (canonical) and direction
    assert (kept.U[:, :4] * streamed.U[:, :4]).sum(0).min().item() > 1 - 1e-4
    assert kept.total_energy == pytest.approx(streamed.total_energy, rel=1e-6)
    assert kept.total_energy == pytest.approx(a.double().square().sum().item(), rel=1e-6)


def test_exact_path_matches_lapack():
    a = fisher_like((300, 200), torch.Generator().manual_seed(1), torch.float32)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    forced = decompose(a, SVDConfig(rank=10, exact=True))
    assert forced.method == "exact" and torch.equal(forced.S, s[:10])
    assert torch.allclose((forced.U * forced.S) @ forced.V.T, (u[:, :10] * s[:10]) @ vh[:10], atol=1e-6 * s[0].item())
    auto = decompose(a, SVDConfig(rank=40))  # (40 + 10) * 4 >= 200: exact is cheaper, so it is used
    assert auto.method == "exact" and torch.equal(auto.S, s[:40])
    assert decompose(a, SVDConfig(rank=20)).method == "randomized"


def test_signs_are_canonical_and_results_deterministic():
    a = fisher_like((512, 384), torch.Generator().manual_seed(2), torch.bfloat16)
    r1, r2 = decompose(a, SVDConfig(rank=8)), decompose(a, SVDConfig(rank=8))
    assert torch.equal(r1.U, r2.U) and torch.equal(r1.S, r2.S) and torch.equal(r1.V, r2.V)
    assert (r1.U.sum(0) >= 0).all()
    exact = decompose(a, SVDConfig(rank=8, exact=True))
    assert (r1.U[:, 0] - exact.U[:, 0]).abs().max().item() < 1e-4  # same sign, same vector
    other_seed = decompose(a, SVDConfig(rank=8, seed=1))
    assert not torch.equal(r1.U, other_seed.U) and torch.allclose(r1.S[:4], other_seed.S[:4], rtol=1e-4)
    # the matrix given is never modified
    assert torch.equal(a, fisher_like((512, 384), torch.Generator().manual_seed(2), torch.bfloat16))


@pytest.mark.parametrize(("transform", "fn"), [("sqrt", torch.sqrt), ("log1p", torch.log1p)])
def test_transforms_decompose_the_transformed_tensor(transform, fn):
    a = fisher_like((400, 300), torch.Generator().manual_seed(4), torch.bfloat16)
    t = fn(a.double())
    ref = torch.linalg.svdvals(t)
    # power_iters=4, not the default 2: randomized SVD resolves sigma_j to about
    # (sigma_{k+p+1} / sigma_j) ** (4q + 2), and realistic near-rank-1 Fisher under sqrt has a flat
    # tail after sigma_1 (sigma_2..sigma_4 = 0.021, 0.017, 0.016 vs sigma_23 = 0.006), so two
    # iterations leave sigma_3 ~7e-5 off — a property of the spectrum, not of the transform under
    # test. Four bring every sigma_j checked below to <= 2e-6, so rtol stays 1e-5.
    r = decompose(a, SVDConfig(rank=12, transform=transform, max_memory=1 << 19, power_iters=4))
    assert r.method == "randomized" and not r.in_memory
    assert torch.allclose(r.S[:4].double(), ref[:4], rtol=1e-5)
    assert _residual(t, r) <= 1.02 * _optimal(ref, 12)
    assert r.total_energy == pytest.approx(ref.square().sum().item(), rel=1e-5)


def test_output_dtype():
    r = decompose(torch.rand(200, 100), SVDConfig(rank=5, dtype="bfloat16"))
    assert r.U.dtype == r.S.dtype == r.V.dtype == torch.bfloat16 and r.U.device.type == "cpu"


def test_non_finite_values_are_refused():
    a = torch.rand(300, 200)
    a[7, 3] = float("nan")
    with pytest.raises(BadInputError, match="tensor 'w' holds NaN or infinite values"):
        decompose(a, SVDConfig(rank=4), name="w")
    with pytest.raises(BadInputError, match="after transform=sqrt"):
        decompose(-torch.rand(300, 200), SVDConfig(rank=4, transform="sqrt", exact=True))


@pytest.mark.parametrize(
    ("shape", "itemsize", "kwargs", "expect"),
    [
        ((5376, 21504), 2, {"rank": 64}, ("randomized", True)),  # 462 MB in fp32: kept
        ((5376, 21504), 2, {"rank": 64, "max_memory": 256 << 20}, ("randomized", False)),
        ((576, 576), 2, {"rank": 128}, ("exact", True)),
        ((576, 576), 2, {"rank": 64}, ("randomized", True)),
        ((4096, 64), 2, {"rank": 8}, ("exact", True)),
    ],
)
def test_plan(shape, itemsize, kwargs, expect):
    plan = plan_decomposition(shape, itemsize, SVDConfig(**kwargs))
    assert (plan.method, plan.in_memory) == expect
    cfg = SVDConfig(**kwargs)
    assert plan.working_bytes <= cfg.max_memory
    assert 1 <= plan.block_rows <= shape[0]


def test_plan_refuses_budgets_it_cannot_keep():
    with pytest.raises(
        BadInputError,
        match=r"tensor 'w': a rank-64 decomposition \(\+16 oversampling\) of a 5376x21504 tensor needs at least "
        r".* over max_memory 1,048,576",
    ):
        plan_decomposition((5376, 21504), 2, SVDConfig(rank=64, max_memory=1 << 20), "w")
    with pytest.raises(BadInputError, match="exact SVD of a 5376x21504 tensor needs about .* drop exact=True"):
        plan_decomposition((5376, 21504), 2, SVDConfig(rank=64, exact=True), "w")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"rank": 4, "oversample": -1}, "oversample must be"),
        ({"rank": 4, "power_iters": 1.5}, "power_iters must be"),
        ({"rank": 4, "transform": "log"}, "transform must be one of"),
        ({"rank": 4, "dtype": "int8"}, "dtype must be one of"),
        ({"rank": 4, "device": "gpu0"}, "device='gpu0' is not one torch knows"),
        ({"rank": True}, "rank must be an integer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(BadInputError, match=match):
        SVDConfig(**kwargs)


def test_config_error_names_the_parameter():
    with pytest.raises(BadInputError) as caught:
        SVDConfig(rank=0)
    assert str(caught.value) == "rank must be an integer >= 1, got 0" and caught.value.param == "rank"
    with pytest.raises(BadInputError) as caught:
        SVDConfig(rank=4, dtype="float64")
    assert str(caught.value) == "dtype must be one of float32, bfloat16, float16, got 'float64'"
    assert caught.value.param == "dtype"


@pytest.mark.parametrize(
    ("dtype", "canonical"),
    [("bf16", "bfloat16"), ("BFloat16", "bfloat16"), (torch.float16, "float16"), ("fp32", "float32")],
)
def test_config_stores_the_canonical_dtype(dtype, canonical):
    cfg = SVDConfig(rank=2, dtype=dtype)
    assert cfg.dtype == canonical and cfg.params()["dtype"] == canonical
    assert decompose(torch.rand(20, 10), cfg).U.dtype == getattr(torch, canonical)


def test_command_errors_name_flags(tmp_path, gemma_store, capsys):
    """The library says ``rank``, ``dtype``, ``max_memory``; the command line says its flags."""
    from fisherstore.cli.main import main

    cases = [
        (["--rank", "0"], "fisherstore: error: --rank must be an integer >= 1, got 0"),
        (["--rank", "2", "--dtype", "int8"], "--dtype must be one of float32, bfloat16, float16, got 'int8'"),
        (["--rank", "2", "--max-memory", "5000"], "over --max-memory 5,000; raise --max-memory"),
    ]
    for flags, expected in cases:
        assert main(["svd", str(gemma_store), "--out", str(tmp_path / "m"), *flags]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# -- whole stores -------------------------------------------------------------------------------


@pytest.fixture
def gemma_store(make_store, gemma_bf16):
    return make_store({**gemma_bf16, "model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, group_size=2)


def test_svd_store_writes_a_mask_store(tmp_path, gemma_store, gemma_bf16, caplog):
    manifest = svd_store(gemma_store, tmp_path / "m", SVDConfig(rank=6))
    assert manifest.complete and manifest.kind == "masks"
    assert "skipping 1 tensors that are not non-empty matrices: model.norm.weight" in caplog.text
    with open_masks(tmp_path / "m") as m, open_store(gemma_store) as src:
        assert m.names == list(gemma_bf16) and m.rank == 6
        assert [g.layers for g in m.manifest.groups] == [(0, 1), (2, 3)]
        assert m.source == source_identity(src)
        assert m.params == {
            "oversample": None,
            "power_iters": 2,
            "transform": "none",
            "dtype": "float32",
            "exact": False,
            "seed": 0,
            "tensors": None,
        }
        for name, f in gemma_bf16.items():
            direct = decompose(f, SVDConfig(rank=6), name=name)
            U, S, V = m.get(name)
            assert torch.equal(U, direct.U) and torch.equal(S, direct.S) and torch.equal(V, direct.V)
            assert m.energy(name) == pytest.approx(direct.energy) and m.residual(name) == pytest.approx(direct.residual)
            assert m.attrs(name)["method"] == direct.method
            assert m.attrs(name)["fisher_sum"] == pytest.approx(src.info(name).sum)


def test_svd_store_tensor_filter_and_errors(tmp_path, gemma_store):
    svd_store(gemma_store, tmp_path / "m", SVDConfig(rank=2), tensors=r"mlp\.(up|down)")
    with open_masks(tmp_path / "m") as m:
        assert len(m) == 8 and all(".mlp.up_proj" in n or ".mlp.down_proj" in n for n in m.names)
    with pytest.raises(BadInputError, match="tensors='lm_head' matches no matrix to decompose"):
        svd_store(gemma_store, tmp_path / "n", SVDConfig(rank=2), tensors="lm_head")
    with pytest.raises(BadInputError, match=r"tensors='\(' is not a valid regular expression"):
        svd_store(gemma_store, tmp_path / "n", SVDConfig(rank=2), tensors="(")
    with pytest.raises(BadInputError, match="already exists"):
        svd_store(gemma_store, tmp_path / "m", SVDConfig(rank=2))
    with pytest.raises(BadInputError, match=r"over max_memory 5,000; raise max_memory"):
        svd_store(gemma_store, tmp_path / "n", SVDConfig(rank=2, max_memory=10_000), workers=2)
    assert not (tmp_path / "n").exists()  # refused before anything was written


def test_resume_continues_and_refuses_other_settings(tmp_path, gemma_store):
    out = tmp_path / "m"
    svd_store(gemma_store, tmp_path / "ref", SVDConfig(rank=3))
    svd_store(gemma_store, out, SVDConfig(rank=3))
    # simulate a run interrupted after group 0: mark group 1 incomplete again
    m = Manifest.load(out / "fisherstore.json")
    doc = m.to_dict()
    doc["groups"][1]["complete"] = False
    doc["tensors"] = {n: t for n, t in doc["tensors"].items() if t["group"] == 0}
    (out / "fisherstore.json").write_text(json.dumps(doc))
    with pytest.raises(BadInputError, match="cannot resume: it was made with rank 3, this run asks for 4"):
        svd_store(gemma_store, out, SVDConfig(rank=4), resume=True)
    with pytest.raises(BadInputError, match="cannot resume: it was made with params"):
        svd_store(gemma_store, out, SVDConfig(rank=3, transform="sqrt"), resume=True)
    svd_store(gemma_store, out, SVDConfig(rank=3, max_memory=64 << 20), resume=True)  # resources may differ
    _same_masks(out, tmp_path / "ref")


def test_resume_refuses_another_source(tmp_path, gemma_store, make_store, gemma_bf16):
    svd_store(gemma_store, tmp_path / "m", SVDConfig(rank=3))
    other = make_store({n: t * 2 for n, t in gemma_bf16.items()})
    with pytest.raises(BadInputError, match="cannot resume: it was computed from another source"):
        svd_store(other, tmp_path / "m", SVDConfig(rank=3), resume=True)


# -- the command ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2GiB", 2 << 30),
        ("512MiB", 512 << 20),
        ("1.5G", int(1.5 * (1 << 30))),
        ("1GB", 10**9),
        ("4096", 4096),
        ("64k", 65536),
    ],
)
def test_parse_size(text, value):
    assert cmd_svd.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError, match="'2 apples' is not a number with an optional unit"):
        cmd_svd.parse_size("2 apples")


def test_command_prints_a_summary_and_json(tmp_path, gemma_store, capsys):
    assert (
        _svd_cli("svd", gemma_store, "--rank", 4, "--out", tmp_path / "m", "--dtype", "bf16", "--tensors", "self_attn")
        == 0
    )
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm'}: masks of 14 tensors, rank 4" in out
    assert "  q         4 tensors  energy mean" in out
    assert (
        _svd_cli(
            "svd",
            gemma_store,
            "-k",
            4,
            "-o",
            tmp_path / "m",
            "--resume",
            "--dtype",
            "bf16",
            "--tensors",
            "self_attn",
            "--json",
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 14 and {r["kind"] for r in rows} == {"q", "k", "v", "o"}
    with open_masks(tmp_path / "m") as m:
        assert m.get(rows[0]["name"])[0].dtype == torch.bfloat16
    with pytest.raises(BadInputError, match="--resume and --overwrite contradict"):
        _svd_cli("svd", gemma_store, "-k", 4, "-o", tmp_path / "m", "--resume", "--overwrite")


def test_mask_table_formatting(tmp_path, gemma_store):
    svd_store(gemma_store, tmp_path / "m", SVDConfig(rank=2), tensors="layers.0.")
    from fisherstore.masks import describe_masks

    with open_masks(tmp_path / "m") as m:
        table = format_mask_table(describe_masks(m)).splitlines()
    assert table[0].split() == ["tensor", "shape", "rank", "method", "energy", "residual"]
    assert len(table) == 8 and table[1].split()[:4] == [
        "model.layers.0.self_attn.q_proj.weight",
        "64x64",
        "2",
        "randomized",
    ]


# -- processes, ranks, kills, memory (slow) -----------------------------------------------------


def _store_of(path, tensors, group_size=1):
    return write_store(path, tensors, group_size=group_size)


@pytest.fixture
def multi_group_store(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": fisher_like((768, 640), g, torch.bfloat16) for i in range(8)}
    return _store_of(tmp_path / "src", tensors)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, multi_group_store):
    args = ("svd", multi_group_store, "--rank", 16, "--exact")
    assert _child(*args, "--out", tmp_path / "ref").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *map(str, args), "--out", str(tmp_path / "m")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = tmp_path / "m" / "fisherstore.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if manifest.exists() and any(g["complete"] for g in json.loads(manifest.read_text())["groups"]):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [g["complete"] for g in json.loads(manifest.read_text())["groups"]]
    assert 0 < sum(done) < len(done), done  # killed mid-run
    resumed = _child(*args, "--out", tmp_path / "m", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'm'}: {sum(done)} of 8 groups already complete" in resumed.stderr
    _same_masks(tmp_path / "m", tmp_path / "ref")
    ref, got = Manifest.load(tmp_path / "ref" / "fisherstore.json"), Manifest.load(manifest)
    assert {n: i.checksum for n, i in ref.tensors.items()} == {n: i.checksum for n, i in got.tensors.items()}


@pytest.mark.slow
def test_out_of_core_peak_rss(tmp_path):
    """A 64 MiB (fp32) tensor under --max-memory 16 MiB: peak RSS <= import baseline + 16 MiB + 32 MiB.

    The fixed 32 MiB covers the allocator's slack, the writer and the CLI; measured
    overshoot of the working set is ~2 MiB.  The spectrum is known, so is the optimum.
    """
    g = torch.Generator().manual_seed(0)
    m = n = 4096
    u = torch.linalg.qr(torch.randn(m, 256, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, 256, generator=g)).Q
    s = torch.exp(-torch.arange(256, dtype=torch.float64) / 24)
    a = (u * s.float()) @ v.T
    src = _store_of(tmp_path / "src", {"model.layers.0.mlp.down_proj.weight": a})
    del u, v
    baseline_kib = int(
        subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout
    )
    run = _child("svd", src, "--rank", 32, "--out", tmp_path / "m", "--max-memory", "16MiB")
    assert run.returncode == 0, run.stderr
    peak_kib = int(run.stderr.rsplit("maxrss_kib", 1)[1])
    assert "streamed, 6 passes" in run.stderr
    assert peak_kib <= baseline_kib + (16 << 10) + (32 << 10), (peak_kib, baseline_kib)
    with open_masks(tmp_path / "m") as masks:
        U, S, V = masks.get("model.layers.0.mlp.down_proj.weight")
    residual = torch.linalg.matrix_norm(a.double() - (U.double() * S.double()) @ V.double().T).item()
    assert residual <= 1.02 * _optimal(s, 32)
    assert _max_orthogonality_error(U) <= 1e-5 and _max_orthogonality_error(V) <= 1e-5


@pytest.mark.slow
def test_two_workers_match_one(tmp_path, multi_group_store):
    svd_store(multi_group_store, tmp_path / "one", SVDConfig(rank=8))
    svd_store(multi_group_store, tmp_path / "two", SVDConfig(rank=8), workers=2)
    _same_masks(tmp_path / "one", tmp_path / "two", exact=False)


def _torchrun_svd(store: object, *options: str) -> list[str]:
    """``fisherstore svd STORE OPTIONS...`` under torchrun with 2 CPU ranks (the DRIVER runs the CLI)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]
    return [*run, sys.executable, "-c", DRIVER, "svd", str(store), *options]


@pytest.mark.slow
def test_torchrun_two_ranks_split_the_tensors(tmp_path, multi_group_store):
    src = tmp_path / "src4"
    with open_store(multi_group_store) as s:
        _store_of(src, {n: s[n] for n in s.names}, group_size=4)  # 2 groups of 4: each rank takes 2 per group
    svd_store(src, tmp_path / "one", SVDConfig(rank=8))
    cmd = _torchrun_svd(src, "--rank", "8", "--out", str(tmp_path / "two"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2 decomposes 4 of them" in run.stderr and "rank 1 of 2 decomposes 4 of them" in run.stderr
    _same_masks(tmp_path / "one", tmp_path / "two", exact=False)
    assert (
        Manifest.load(tmp_path / "two" / "fisherstore.json").attrs
        == Manifest.load(tmp_path / "one" / "fisherstore.json").attrs
    )


@pytest.fixture
def store_with_a_nan(tmp_path):
    """Under --transform sqrt, layer 2 (negative values) becomes NaN."""
    g = torch.Generator().manual_seed(6)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": fisher_like((256, 128), g, torch.float32) for i in range(4)}
    tensors["model.layers.2.mlp.up_proj.weight"] *= -1
    return _store_of(tmp_path / "nan", tensors, group_size=2)


@pytest.mark.slow
def test_a_worker_error_reaches_the_caller(tmp_path, store_with_a_nan):
    with pytest.raises(
        BadInputError, match="tensor 'model.layers.2.mlp.up_proj.weight' holds NaN .* after transform=sqrt"
    ):
        svd_store(store_with_a_nan, tmp_path / "m", SVDConfig(rank=4, transform="sqrt"), workers=2)
    assert [g.complete for g in Manifest.load(tmp_path / "m" / "fisherstore.json").groups] == [True, False]


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank(tmp_path, store_with_a_nan):
    cmd = _torchrun_svd(store_with_a_nan, "--rank", "4", "--transform", "sqrt", "--out", str(tmp_path / "m"))
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # a hang would time out
    assert run.returncode != 0
    assert "tensor 'model.layers.2.mlp.up_proj.weight' holds NaN" in run.stderr
    assert "svd failed on another rank: rank " in run.stderr
    assert [g.complete for g in Manifest.load(tmp_path / "m" / "fisherstore.json").groups] == [True, False]
