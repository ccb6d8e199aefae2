"""GPU checks: extraction, lazy reads, training hooks and SVD on CUDA, against the same work on the CPU.

Every test is skipped where CUDA is unavailable (CI has no GPU).  Tolerances
are for fp32 arithmetic done in a different order on each device; they were
set from what fp32 rounding does on the CPU (tiny Gemma-4 Fisher, fp32 run vs
an fp64 run: per-tensor ‖Δ‖/‖F‖ ≤ 1.3e-5, elementwise ≤ 3.9e-4 relative with
an absolute floor of 1e-6·max), with a margin, while a real defect (a wrong
label, a lost prompt, a mask on the wrong device) moves values by O(1).

``FISHERSTORE_GPU_TEST_DEVICE=cpu`` runs the same tests with the CPU as the
"GPU" side (a dry run of the test code itself; every comparison is then CPU
against CPU).  Measured differences are printed: ``pytest -rA`` shows them.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import pytest
import torch

from fisherstore import convert, open_store, verify
from fisherstore.masks import open_masks, write_masks
from fisherstore.naming import canonical_name
from fisherstore.testing import (
    fisher_like,
    fisher_like_tensors,
    tiny_gemma4_config,
    tiny_gemma4_model,
    write_store,
)

DEVICE = torch.device(os.environ.get("FISHERSTORE_GPU_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (none is available here)"
)

NUM_PROMPTS = 4
MAX_LENGTH = 40
NORM_RTOL = 5e-4  # per tensor ‖F_gpu − F_cpu‖ / ‖F_cpu‖
ELEM_RTOL = 1e-2  # elementwise, with an absolute floor of ELEM_ATOL·max|F|
ELEM_ATOL = 1e-6
ENERGY_ATOL = 1e-5  # captured-energy fraction of an fp32 SVD, device vs CPU and exact vs fp64 (the CPU: <= 7e-7)
BOUND = 1e-5  # the fp32 subspace invariant ‖UᵀΔW‖/‖ΔW‖ of param-mode projection


def _report(what: str, **values: object) -> None:
    print(
        f"[gpu] {what}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64 (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())


def _layout(store) -> tuple:
    """Everything about a store's layout that must not depend on the compute device."""
    m = store.manifest
    tensors = tuple((n, tuple(i.shape), i.dtype, i.layer, i.kind, i.group) for n, i in m.tensors.items())
    groups = tuple((g.index, tuple(g.layers), tuple(s.name for s in g.tensors), g.complete) for g in m.groups)
    return m.kind, m.backend, tensors, groups


def _cli(*args) -> tuple[int, str]:
    from fisherstore.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


# -- 1. extraction ---------------------------------------------------------------------------


def _extract_cli(out, device: torch.device, *extra) -> dict:
    code, stdout = _cli(
        "--quiet",
        "extract",
        "tiny-gemma4",
        "--out",
        out,
        "--device",
        str(device),
        "--num-prompts",
        NUM_PROMPTS,
        "--max-length",
        MAX_LENGTH,
        "--group-size",
        2,
        "--json",
        *extra,
    )
    assert code == 0, stdout
    return json.loads(stdout)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """fp32 stores of the tiny Gemma-4's Fisher extracted by the CLI on the CPU and on the GPU."""
    root = tmp_path_factory.mktemp("extract")
    runs = {}
    for name, device in (("cpu", torch.device("cpu")), ("gpu", DEVICE)):
        summary = _extract_cli(root / name, device, "--dtype", "fp32")
        runs[name] = (root / name, summary)
    return runs


def test_cuda_extraction_matches_cpu(extracted):
    (cpu_path, cpu_summary), (gpu_path, gpu_summary) = extracted["cpu"], extracted["gpu"]
    print(
        f"[gpu] torch {torch.__version__}, allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32}, "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()}"
    )
    if DEVICE.type == "cuda":
        assert gpu_summary["peak_device_bytes"] and gpu_summary["peak_device_bytes"] > 0
        _report(
            "extract on cuda",
            seconds=gpu_summary["seconds"],
            peak_device_mib=gpu_summary["peak_device_bytes"] / 2**20,
            cpu_seconds=cpu_summary["seconds"],
        )
    assert cpu_summary["peak_device_bytes"] is None
    for key in ("groups_total", "groups_run", "num_prompts", "tokens_per_pass", "tokens_processed", "group_size"):
        assert gpu_summary[key] == cpu_summary[key], key
    assert (gpu_summary["groups_total"], gpu_summary["num_prompts"]) == (2, NUM_PROMPTS)

    with open_store(cpu_path) as cpu, open_store(gpu_path) as gpu:
        assert cpu.complete and gpu.complete
        assert _layout(gpu) == _layout(cpu)  # same names, order, shapes, dtypes, layers, kinds, groups
        assert len(cpu.names) == 26 and all(cpu.info(n).dtype == "float32" for n in cpu.names)
        for key in ("config_hash", "prompts_sha256", "num_prompts", "tokens", "max_length", "estimator", "targets"):
            assert gpu.manifest.provenance[key] == cpu.manifest.provenance[key], key
        worst_norm, worst_elem = 0.0, 0.0
        for name in cpu.names:
            c, g = cpu[name], gpu[name]
            assert g.dtype == c.dtype == torch.float32 and g.shape == c.shape
            assert torch.isfinite(g).all() and (g >= 0).all() and float(g.max()) > 0, name
            worst_norm = max(worst_norm, _rel(g, c))
            floor = ELEM_ATOL * float(c.abs().max())
            worst_elem = max(worst_elem, float(((g - c).abs() / (c.abs() + floor)).max()))
            torch.testing.assert_close(g, c, rtol=ELEM_RTOL, atol=floor, msg=name)
            assert _rel(g, c) < NORM_RTOL, (name, _rel(g, c))
        _report("extraction gpu vs cpu (fp32 store)", worst_tensor_rel=worst_norm, worst_elem_rel=worst_elem)
        imp_c, imp_g = cpu.layer_importance(), gpu.layer_importance()
        assert sorted(imp_c) == sorted(imp_g) == [0, 1, 2, 3]
        for layer in imp_c:
            assert imp_g[layer] == pytest.approx(imp_c[layer], rel=NORM_RTOL), layer
    for path in (cpu_path, gpu_path):
        assert verify(path) == []
        code, out = _cli("verify", path)
        assert code == 0, out
    imp_file_c = json.loads((cpu_path / "layer_importance.json").read_text())["layers"]
    imp_file_g = json.loads((gpu_path / "layer_importance.json").read_text())["layers"]
    assert imp_file_g.keys() == imp_file_c.keys()
    assert all(imp_file_g[k] == pytest.approx(imp_file_c[k], rel=NORM_RTOL) for k in imp_file_c)


def test_cuda_bf16_store_is_the_rounded_fp32_mean(extracted, tmp_path):
    """The default bf16 store on the GPU holds the fp32 mean rounded once (fp32 accumulation on the device)."""
    gpu_fp32_path, _ = extracted["gpu"]
    summary = _extract_cli(tmp_path / "bf16", DEVICE)  # default --dtype bf16
    assert summary["groups_total"] == 2
    exact, total = 0, 0
    with open_store(gpu_fp32_path) as fp32, open_store(tmp_path / "bf16") as bf16:
        assert [(n, i.shape, i.group) for n, i in bf16.manifest.tensors.items()] == [
            (n, i.shape, i.group) for n, i in fp32.manifest.tensors.items()
        ]
        for name in fp32.names:
            f, b = fp32[name], bf16[name]
            assert b.dtype == torch.bfloat16
            # bf16 keeps 8 significant bits: at most half an ulp (2^-9) from the fp32 value it rounds,
            # plus run-to-run noise
            torch.testing.assert_close(b.float(), f, rtol=2**-8, atol=ELEM_ATOL * float(f.max()), msg=name)
            exact += int((b == f.to(torch.bfloat16)).sum())
            total += f.numel()
    _report("bf16 store vs rounded fp32 store (two cuda runs)", identical_fraction=exact / total)
    assert exact / total > 0.99
    assert verify(tmp_path / "bf16") == []


class _Interrupted(Exception):
    """Raised from inside a forward pass to stop an extraction mid-group, as a crash would."""


def test_cuda_interrupted_extraction_resumes_to_the_uninterrupted_store(extracted, tmp_path):
    """The resume contract on the device: an interrupted run plus ``resume`` gives the same store, bit for bit."""
    from fisherstore import ExtractConfig, extract, load_prompts
    from fisherstore.models import TINY_GEMMA4, load_model

    loaded = load_model(TINY_GEMMA4, device=DEVICE)
    prompts = load_prompts(limit=NUM_PROMPTS)
    kwargs = dict(group_size=2, max_length=MAX_LENGTH, dtype="fp32")  # as the CLI run
    calls = 0

    def interrupt(module, args):
        nonlocal calls
        calls += 1
        if calls > NUM_PROMPTS + 1:  # the second prompt of group 1, after group 0 was handed to the writer
            raise _Interrupted

    handle = loaded.model.get_input_embeddings().register_forward_pre_hook(interrupt)
    with pytest.raises(_Interrupted):
        extract(
            loaded.model,
            loaded.tokenizer,
            prompts,
            tmp_path / "r",
            ExtractConfig(**kwargs),
            provenance=loaded.provenance,
        )
    handle.remove()
    state = json.loads((tmp_path / "r" / "fisherstore.json").read_text())
    assert state["complete"] is False and [g["complete"] for g in state["groups"]] == [True, False]
    config = ExtractConfig(resume=True, **kwargs)
    summary = extract(loaded.model, loaded.tokenizer, prompts, tmp_path / "r", config, provenance=loaded.provenance)
    assert (summary.groups_total, summary.groups_run) == (2, 1)
    assert verify(tmp_path / "r") == []
    whole_path, _ = extracted["gpu"]
    differ = {}
    with open_store(tmp_path / "r") as resumed, open_store(whole_path) as whole:
        assert _layout(resumed) == _layout(whole)
        for name in whole.names:
            if resumed.info(name).checksum != whole.info(name).checksum or not torch.equal(resumed[name], whole[name]):
                differ[name] = _rel(resumed[name], whole[name])
    _report(
        "resume on the device vs an uninterrupted run",
        tensors_differing=len(differ),
        worst_rel=max(differ.values(), default=0.0),
    )
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run (relative differences {differ})"


def test_cuda_extraction_python_api_sampled_estimator(tmp_path):
    """Sampled labels come from a per-prompt CUDA generator: every group sees the same labels."""
    from fisherstore import ExtractConfig, extract, load_prompts
    from fisherstore.models import TINY_GEMMA4, load_model

    loaded = load_model(TINY_GEMMA4, device=DEVICE)
    assert next(loaded.model.parameters()).device.type == DEVICE.type
    prompts = load_prompts(limit=NUM_PROMPTS)
    stores = {}
    for label, kwargs in (
        ("s1", dict(estimator="sampled", group_size=1)),
        ("s4", dict(estimator="sampled", group_size=4)),
        ("emp", dict(estimator="empirical", group_size=4)),
    ):
        extract(
            loaded.model,
            loaded.tokenizer,
            prompts,
            tmp_path / label,
            ExtractConfig(max_length=MAX_LENGTH, dtype="fp32", **kwargs),
            provenance=loaded.provenance,
        )
        with open_store(tmp_path / label) as s:
            stores[label] = {n: s[n] for n in s.names}
    assert next(loaded.model.parameters()).device.type == DEVICE.type  # the model stays where it was
    assert all(not p.requires_grad for p in loaded.model.parameters())
    worst_groups, worst_vs_emp = 0.0, math.inf
    for name, one in stores["s1"].items():
        four = stores["s4"][name]
        torch.testing.assert_close(four, one, rtol=1e-4, atol=ELEM_ATOL * float(one.max()), msg=name)
        worst_groups = max(worst_groups, _rel(four, one))
        worst_vs_emp = min(worst_vs_emp, _rel(one, stores["emp"][name]))
    _report("sampled estimator on cuda", group1_vs_group4_rel=worst_groups, min_sampled_vs_empirical_rel=worst_vs_emp)
    assert worst_groups < 1e-5
    assert worst_vs_emp > 1e-2  # sampled labels really differ from the prompt's own tokens
    with open_store(tmp_path / "s4") as s:
        assert s.manifest.provenance["estimator"] == "sampled" and verify(s) == []


# -- 2. lazy reads onto the device -----------------------------------------------------------


@pytest.fixture(scope="module")
def read_sources(tmp_path_factory):
    """The same tensors (26 small bf16 ones and a 1.25 MiB one, read by memory map) in every source format."""
    root = tmp_path_factory.mktemp("reads")
    tensors = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16)
    tensors["lm_head.weight"] = fisher_like((1024, 640), torch.Generator().manual_seed(7))  # > MAP_MIN_BYTES
    tensors["model.norm.weight"] = fisher_like((64,), torch.Generator().manual_seed(8), torch.float32)  # 1-d
    paths = {
        "safetensors": write_store(root / "st", tensors),
        "zarr": write_store(root / "z", tensors, backend="zarr"),
        "zarr-compressed": write_store(root / "zc", tensors, backend="zarr", compression="blosc-zstd-bitshuffle"),
    }
    convert(paths["safetensors"], root / "fisher.pt")
    paths["fisher.pt"] = root / "fisher.pt"
    return tensors, paths


@pytest.mark.parametrize("source", ["safetensors", "zarr", "zarr-compressed", "fisher.pt"])
def test_cuda_lazy_reads_match_cpu_reads(read_sources, source):
    tensors, paths = read_sources
    with open_store(paths[source]) as store:
        assert sorted(store.names) == sorted(tensors)
        for name, expected in tensors.items():
            cpu = store[name]
            assert cpu.device.type == "cpu"
            on_dev = store.read(name, device=DEVICE)
            assert (
                on_dev.device.type == DEVICE.type and on_dev.dtype == expected.dtype and on_dev.shape == expected.shape
            )
            assert torch.equal(on_dev.cpu(), cpu) and torch.equal(cpu, expected), name
            assert torch.equal(store.read(name, device=str(DEVICE)).cpu(), expected), name
            rows = expected.shape[0]
            for start, stop in (
                (0, rows),
                (3, min(rows, 17)),
                (rows // 2, rows),
                (1, rows),
            ):  # (1, rows): mapped for lm_head
                part = store.read(name, rows=(start, stop), dtype=torch.float32, device=DEVICE)
                assert part.device.type == DEVICE.type and part.dtype == torch.float32
                assert torch.equal(part.cpu(), expected[start:stop].float()), (name, start, stop)
            sliced = store.read(name, rows=slice(2, 9), device=DEVICE)
            assert torch.equal(sliced.cpu(), expected[2:9]), name


def test_cuda_mask_reads_match_cpu(tmp_path):
    g = torch.Generator().manual_seed(3)
    triples = {}
    for name, t in fisher_like_tensors(tiny_gemma4_config(), dtype=torch.float32).items():
        m, n = t.shape
        triples[name] = (
            torch.linalg.qr(torch.randn(m, 6, generator=g)).Q,
            torch.linspace(3, 1, 6),
            torch.linalg.qr(torch.randn(n, 6, generator=g)).Q,
        )
    write_masks(tmp_path / "m", triples)
    with open_masks(tmp_path / "m") as masks:
        for name in masks.names:
            cpu = masks.get(name, rank=4)
            dev = masks.get(name, rank=4, device=DEVICE, dtype=torch.float32)
            for c, d in zip(cpu, dev):
                assert d.device.type == DEVICE.type and d.is_contiguous()
                assert torch.equal(d.cpu(), c), name
            assert torch.equal(cpu[0], triples[name][0][:, :4]) and torch.equal(cpu[2], triples[name][2][:, :4])


# -- 3. training hooks on a CUDA PEFT LoRA model -----------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPORTANCE = {0: 1.0, 1: 4.0, 2: 0.25, 3: 100.0}
K = 8


def _lora_model(seed: int = 0):
    peft = pytest.importorskip("peft")
    base = tiny_gemma4_model(seed).to(DEVICE)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    return model


def _adapted(model):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _random_masks(model) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random orthonormal U (m×K), V (n×K) per LoRA target, on the CPU (written to a mask store)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, module in _adapted(model):
        m, n = module.out_features, module.in_features
        U = torch.linalg.qr(torch.randn(m, K, generator=g, dtype=torch.float64)).Q.float()
        V = torch.linalg.qr(torch.randn(n, K, generator=g, dtype=torch.float64)).Q.float()
        out[canonical_name(name)] = (U, torch.linspace(2.0, 1.0, K), V)
    return out


def _leaks(model, triples) -> dict[str, tuple[float, float, float]]:
    """module → (‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖, ‖ΔW‖), ΔW from PEFT on the device, U and V as generated."""
    out = {}
    with torch.no_grad():
        for name, module in _adapted(model):
            U, _, V = (t.to(DEVICE) for t in triples[canonical_name(name)])
            dW = module.get_delta_weight("default")
            assert dW.device.type == DEVICE.type and dW.dtype == torch.float32
            norm = torch.linalg.norm(dW)
            out[name] = (
                float(torch.linalg.norm(U.T @ dW) / norm),
                float(torch.linalg.norm(dW @ V) / norm),
                float(norm),
            )
    return out


def _train(model, opt, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 16), generator=g).to(DEVICE)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def test_cuda_param_mode_projection_keeps_the_invariant_under_adamw(tmp_path):
    from fisherstore.training import attach_training

    model = _lora_model()
    triples = _random_masks(model)
    write_masks(tmp_path / "masks", triples)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    hooks = attach_training(model, masks=tmp_path / "masks", importance=IMPORTANCE, optimizer=opt, mode="param")
    assert len(hooks.projector.coverage.covered) == 26 and not hooks.projector.coverage.missing
    assert len(hooks.scaler.coverage.covered) == 26 and not hooks.scaler.coverage.missing
    _train(model, opt, steps=10)
    measured = _leaks(model, triples)
    assert len(measured) == 26
    worst = max(max(left, right) for left, right, _ in measured.values())
    for name, (left, right, norm) in measured.items():
        assert left < BOUND and right < BOUND, (name, left, right)
        assert norm > 1e-2, (name, norm)  # ΔW clearly non-zero: the model did train
    own = hooks.projector.leak()
    assert len(own) == 26 and max(max(v) for v in own.values()) < BOUND
    hooks.detach()

    control = _lora_model()  # the same training without projection leaks: the check above can fail
    opt = torch.optim.AdamW([p for p in control.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    _train(control, opt, steps=10)
    unprojected = sorted(max(left, right) for left, right, _ in _leaks(control, triples).values())
    _report("param-mode AdamW x10 on cuda", worst_projected_leak=worst, median_unprojected_leak=unprojected[13])
    assert unprojected[13] > 1e-2


def test_cuda_layer_scaler_multiplies_lora_grads():
    from fisherstore.naming import parse_name
    from fisherstore.training import LayerScaler

    plain, scaled = _lora_model(), _lora_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a non-zero B, so that both LoRA factors get gradients
        for model in (plain, scaled):
            g.manual_seed(5)
            for _, module in _adapted(model):
                w = module.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g).to(DEVICE) * 0.1)
    scaler = LayerScaler(scaled, IMPORTANCE)
    assert len(scaler.coverage.covered) == 26
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for model in (plain, scaled):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    scaled_grads = {n: p.grad for n, p in scaled.named_parameters() if p.requires_grad}
    assert len(grads) == 52
    worst = 0.0
    for name, gp in grads.items():
        factor = scaler.factors[parse_name(name)[0]]
        gs = scaled_grads[name]
        assert gs.device.type == DEVICE.type and float(gp.abs().max()) > 0
        torch.testing.assert_close(gs, gp * factor, rtol=1e-4, atol=1e-5 * float(gp.abs().max()) * factor, msg=name)
        worst = max(worst, _rel(gs, gp * factor))
    _report("layer scaler on cuda", worst_rel=worst)


# -- 4. SVD on the device ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def svd_source(tmp_path_factory):
    """A bf16 Fisher-like store: the 26 tiny Gemma-4 targets and one 512×384 tensor that streams."""
    tensors = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.bfloat16)
    tensors["model.layers.3.extra.weight"] = fisher_like((512, 384), torch.Generator().manual_seed(11))
    return write_store(tmp_path_factory.mktemp("svd") / "fisher", tensors)


def _mask_layout(path) -> tuple:
    with open_masks(path) as masks:
        return (masks.names, masks.rank, _layout(masks.store))


def _compare_masks(dev_path, cpu_path, label: str) -> None:
    assert _mask_layout(dev_path) == _mask_layout(cpu_path)
    worst_s, worst_rec, worst_energy, worst_orth = 0.0, 0.0, 0.0, 0.0
    with open_masks(dev_path) as d, open_masks(cpu_path) as c:
        for name in c.names:
            (Ud, Sd, Vd), (Uc, Sc, Vc) = d.get(name), c.get(name)
            assert Ud.dtype == Uc.dtype == torch.float32 and Ud.device.type == "cpu"
            torch.testing.assert_close(Sd, Sc, rtol=1e-4, atol=1e-5 * float(Sc[0]), msg=name)
            worst_s = max(worst_s, _rel(Sd, Sc))
            rd, rc = (Ud.double() * Sd.double()) @ Vd.double().T, (Uc.double() * Sc.double()) @ Vc.double().T
            worst_rec = max(worst_rec, _rel(rd, rc))
            eye = torch.eye(Ud.shape[1], dtype=torch.float64)
            worst_orth = max(
                worst_orth,
                float((Ud.double().T @ Ud.double() - eye).abs().max()),
                float((Vd.double().T @ Vd.double() - eye).abs().max()),
            )
            # the leading mode is well separated in a nearly rank-1 Fisher: same vector, same sign (canonical signs)
            assert float(Ud[:, 0] @ Uc[:, 0]) > 1 - 1e-4 and float(Vd[:, 0] @ Vc[:, 0]) > 1 - 1e-4, name
            ed, ec = d.energy(name), c.energy(name)
            assert ed == pytest.approx(ec, abs=ENERGY_ATOL), name
            worst_energy = max(worst_energy, abs(ed - ec))
    _report(
        f"svd {label} device vs cpu",
        worst_S_rel=worst_s,
        worst_reconstruction_rel=worst_rec,
        worst_energy_abs=worst_energy,
        worst_orthogonality=worst_orth,
    )
    assert worst_rec < 1e-3
    assert worst_orth <= 1e-5, (
        f"U or V columns orthonormal only to {worst_orth:.3g} (FORMAT.md: orthonormal; test_svd's bar: 1e-5)"
    )
    assert verify(dev_path) == [] and verify(cpu_path) == []


@pytest.mark.parametrize(
    ("label", "options"),
    [("randomized", {}), ("exact", {"exact": True}), ("streamed", {"max_memory": 400_000})],
)
def test_cuda_svd_store_matches_cpu(svd_source, tmp_path, label, options):
    from fisherstore.svd import SVDConfig, decompose_tensor, svd_store

    if label == "streamed":  # the 512×384 tensor is re-read in row blocks into a device buffer
        with open_store(svd_source) as store:
            assert not decompose_tensor(
                store, "model.layers.3.extra.weight", SVDConfig(rank=4, device=str(DEVICE), **options)
            ).in_memory
    manifests = {}
    for side, device in (("cpu", "cpu"), ("dev", str(DEVICE))):
        manifests[side] = svd_store(svd_source, tmp_path / side, SVDConfig(rank=4, device=device, **options))
        assert manifests[side].complete
    assert manifests["dev"].attrs == manifests["cpu"].attrs  # device is a resource, not a parameter
    _compare_masks(tmp_path / "dev", tmp_path / "cpu", label)
    if label == "exact":  # the recorded energy of an exact decomposition, against an fp64 SVD of the same tensor
        errors = {"cpu": 0.0, "dev": 0.0}
        with open_store(svd_source) as source:
            for name in source.names:
                a = source[name].double()
                s = torch.linalg.svdvals(a)
                truth = float(s[:4].square().sum() / a.square().sum())
                for side in errors:
                    with open_masks(tmp_path / side) as masks:
                        errors[side] = max(errors[side], abs(masks.energy(name) - truth))
        _report("svd exact energy vs fp64", cpu_worst_abs=errors["cpu"], device_worst_abs=errors["dev"])
        assert errors["cpu"] < 1e-5 and errors["dev"] < ENERGY_ATOL


def test_cuda_svd_workers_match_one_process(svd_source, tmp_path):
    """Two spawned workers on the device give what one process on the device gives."""
    from fisherstore.svd import SVDConfig, svd_store

    cfg = SVDConfig(rank=4, device=str(DEVICE))
    svd_store(svd_source, tmp_path / "one", cfg)
    svd_store(svd_source, tmp_path / "two", cfg, workers=2)
    assert _mask_layout(tmp_path / "two") == _mask_layout(tmp_path / "one")
    identical = True
    with open_masks(tmp_path / "one") as a, open_masks(tmp_path / "two") as b:
        for name in a.names:
            for x, y in zip(a.get(name), b.get(name)):
                identical &= torch.equal(x, y)
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6 * float(x.abs().max()), msg=name)
    _report("svd workers=2 vs workers=1 on the device", bit_identical=identical)
    assert verify(tmp_path / "two") == []
