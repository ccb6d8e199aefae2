"""``fisherstore merge``: the prompt-weighted mean of stores of disjoint prompt sets equals one run over their union.

Tolerance: merging fp32 stores of 3 and 5 prompts is compared with one fp32 run over the 8 prompts at
rtol 1e-5 and atol 0 (every Fisher value is a sum of squares, so there is no cancellation; measured
worst relative difference ~3e-7, a few fp32 ulps from re-associating the sums).  Everything else (bf16
arithmetic, block sizes, backends) is checked bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fisherstore import ExtractConfig, convert, extract, open_store, verify
from fisherstore.errors import ChecksumMismatchError
from fisherstore.manifest import IMPORTANCE_NAME, TensorSpec, importance_document
from fisherstore.merging import merge_stores
from fisherstore.models import TINY_GEMMA4, load_model
from fisherstore.testing import fisher_like_tensors, tiny_gemma4_config
from fisherstore.testing.kills import count_writes, killed_run, run_kill_trials, same_result
from fisherstore.writer import StoreWriter, plan_groups

from .conftest import tree_digest

WORDS = ["cats", "dogs", "birds", "fish", "trees", "rocks", "clouds", "rivers"]
PROMPTS = [f"Prompt {i}: say something about {w}." for i, w in enumerate(WORDS)]
P1, P2 = PROMPTS[:3], PROMPTS[3:]  # disjoint, 3 and 5 prompts


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Extracted stores of the tiny Gemma-4: P1, P2 and P1+P2 in fp32, P1 and P2 in bf16 (~0.5 s each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny = load_model(TINY_GEMMA4)
    root = tmp_path_factory.mktemp("extracted")
    out = {}
    for name, prompts, dtype in (
        ("p1", P1, "fp32"),
        ("p2", P2, "fp32"),
        ("all", PROMPTS, "fp32"),
        ("p1_bf16", P1, "bf16"),
        ("p2_bf16", P2, "bf16"),
    ):
        out[name] = root / name
        config = ExtractConfig(dtype=dtype, max_length=32)
        extract(tiny.model, tiny.tokenizer, prompts, out[name], config, provenance=tiny.provenance)
    torch.set_num_threads(before)
    return out


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with open_store(path) as s:
        return {n: s[n].clone() for n in s.names}


def test_merge_equals_one_run_over_the_union(stores, tmp_path):
    out = tmp_path / "merged"
    summary = merge_stores([stores["p1"], stores["p2"]], out)
    assert (summary.num_prompts, summary.counts, summary.weights) == (8, (3, 5), (3 / 8, 5 / 8))
    merged, whole = tensors_of(out), tensors_of(stores["all"])
    assert sorted(merged) == sorted(whole) and len(merged) == 26
    for name, expected in whole.items():
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=0, msg=name)
    assert verify(out) == []
    with open_store(out) as m, open_store(stores["all"]) as w:
        prov = m.manifest.provenance
        assert m.complete and m.format == "safetensors"  # the first input's backend
        assert prov["num_prompts"] == 8 and prov["tokens"] == w.manifest.provenance["tokens"]
        assert m.manifest.attrs["num_samples"] == 8 and m.manifest.attrs["tokens"] == prov["tokens"]
        for key in ("config_hash", "targets", "estimator", "max_length", "chat_template", "chat_template_sha256"):
            assert prov[key] == w.manifest.provenance[key], key
        inputs = prov["merged_from"]
        assert [i["path"] for i in inputs] == [str(stores["p1"].resolve()), str(stores["p2"].resolve())]
        assert [i["num_prompts"] for i in inputs] == [3, 5] and [i["weight"] for i in inputs] == [3 / 8, 5 / 8]
        for entry, src in zip(inputs, (stores["p1"], stores["p2"]), strict=True):
            with open_store(src) as s:
                assert entry["prompts_sha256"] == s.manifest.provenance["prompts_sha256"]
                assert entry["tokens"] == s.manifest.provenance["tokens"]
        assert len({i["prompts_sha256"] for i in inputs} | {prov["prompts_sha256"]}) == 3
        # the recorded sums describe the merged bytes, and agree with one run's to the same tolerance
        for name in m.names:
            info = m.info(name)
            assert info.sum == pytest.approx(float(merged[name].double().sum()), rel=1e-6), name
            assert info.sum == pytest.approx(w.info(name).sum, rel=1e-5), name
        doc = json.loads((out / IMPORTANCE_NAME).read_text())
        assert doc == json.loads(json.dumps(importance_document(m.manifest)))
        assert doc["provenance"]["num_prompts"] == 8
        for layer, total in doc["layers"].items():
            data = sum(float(t.double().sum()) for n, t in merged.items() if f"layers.{layer}." in n)
            assert total == pytest.approx(data, rel=1e-6)


def test_bf16_inputs_merge_with_one_rounding(stores, tmp_path):
    out = tmp_path / "merged_bf16"
    merge_stores([stores["p1_bf16"], stores["p2_bf16"]], out)
    merged, a, b = tensors_of(out), tensors_of(stores["p1_bf16"]), tensors_of(stores["p2_bf16"])
    whole = tensors_of(stores["all"])
    for name, got in merged.items():
        assert got.dtype == torch.bfloat16
        expected = ((3 * a[name].float() + 5 * b[name].float()) / 8).to(torch.bfloat16)
        assert torch.equal(got, expected), name
        torch.testing.assert_close(got.float(), whole[name], rtol=2**-6, atol=0, msg=name)  # bf16 inputs' rounding
    assert verify(out) == []


def test_mixed_backends_and_block_sizes_give_the_same_bytes(stores, tmp_path):
    zarr_p2 = convert(stores["p2"], tmp_path / "p2.zarr", backend_options={"compression": "zstd"})
    reference = tensors_of(merge_stores([stores["p1"], stores["p2"]], tmp_path / "ref").store)
    mixed = merge_stores([stores["p1"], zarr_p2], tmp_path / "mixed", block_bytes=4 * 1000)  # odd blocks
    assert mixed.backend == "safetensors"
    to_zarr = merge_stores([zarr_p2, stores["p1"]], tmp_path / "out.zarr")  # first input zarr: its options
    with open_store(to_zarr.store) as z:
        assert z.format == "zarr" and z.manifest.backend_options["compression"] == "zstd"
    got = tensors_of(Path(mixed.store))
    assert sorted(got) == sorted(reference) and all(torch.equal(got[n], reference[n]) for n in reference)
    # with the inputs swapped the sum is re-associated: equal to the reference within the fp32 tolerance
    swapped = tensors_of(Path(to_zarr.store))
    for n, t in reference.items():
        torch.testing.assert_close(swapped[n], t, rtol=1e-6, atol=0)


# -- refusals --------------------------------------------------------------------------------------

BASE = {
    "config_hash": "sha256:aa",
    "targets": "proj",
    "estimator": "empirical",
    "max_length": 40,
    "chat_template": True,
    "chat_template_sha256": "sha256:bb",
    "num_prompts": 4,
}


@pytest.fixture(scope="module")
def fp32_tensors():
    return fisher_like_tensors(tiny_gemma4_config(), dtype=torch.float32)


def synthetic(path, tensors, provenance=None, groups=None, backend="safetensors"):
    """A Fisher store of ``tensors`` in groups of 2 layers with BASE provenance (``groups``: only those written)."""
    plan = plan_groups([TensorSpec.of(n, t) for n, t in tensors.items()], 2)
    with StoreWriter.create(path, plan, backend=backend, provenance={**BASE, **(provenance or {})}) as w:
        for g in plan if groups is None else [plan[i] for i in groups]:
            w.write_group(g.index, {s.name: tensors[s.name] for s in g.tensors})
        if groups is None:
            w.finish()
    return path


def _variant(tmp_path, tensors, case):
    """``(argv after 'merge', words the error must contain)`` for a refusal case."""
    a = synthetic(tmp_path / "a", tensors)
    out = tmp_path / "out"
    prov = {
        "config_hash": ({"config_hash": "sha256:cc"}, "model (config hash) differs"),
        "targets": ({"targets": "q_proj"}, "targets differs"),
        "estimator": ({"estimator": "sampled"}, "estimator differs"),
        "max_length": ({"max_length": 64}, "max length differs"),
        "chat_template": ({"chat_template": False, "chat_template_sha256": None}, "chat template differs"),
        "no_count": ({"num_prompts": None}, "records no prompt count"),
    }
    if case in prov:
        change, words = prov[case]
        return [a, synthetic(tmp_path / "b", tensors, change), "-o", out], words
    if case == "dtype":
        b = synthetic(tmp_path / "b", {n: t.bfloat16() for n, t in tensors.items()})
        return [a, b, "-o", out], "storage dtype differs"
    if case == "tensor_set":
        b = synthetic(tmp_path / "b", {n: t for n, t in tensors.items() if "layers.3.mlp.up" not in n})
        return [a, b, "-o", out], "their tensors differ"
    if case == "shape":
        name = next(n for n in tensors if "layers.2.mlp.down" in n)
        b = synthetic(tmp_path / "b", {**tensors, name: tensors[name][:-1]})
        return [a, b, "-o", out], f"tensor {name!r} is"
    if case == "incomplete":
        return [a, synthetic(tmp_path / "b", tensors, groups=[0]), "-o", out], "groups [1] are not written"
    if case == "single":
        return [a, "-o", out], "at least two input stores, got 1"
    if case == "twice":
        return [a, a, "-o", out], "is given twice"
    if case == "out_is_input":
        b = synthetic(tmp_path / "b", tensors)
        return [a, b, "-o", b, "--overwrite"], "--out " + str(b) + " must not be an input"
    if case == "out_inside_input":
        b = synthetic(tmp_path / "b", tensors)
        return [a, b, "-o", b / "sub"], "must not be an input or lie inside one"
    if case == "file":
        f = tmp_path / "b.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, f)
        return [a, f, "-o", out], "records no prompt count"
    if case == "zarr_option":
        return [a, synthetic(tmp_path / "b", tensors), "-o", out, "--compression", "zstd"], "--format zarr"
    raise AssertionError(case)


CASES = [
    "config_hash",
    "targets",
    "estimator",
    "max_length",
    "chat_template",
    "no_count",
    "dtype",
    "tensor_set",
    "shape",
    "incomplete",
    "single",
    "twice",
    "out_is_input",
    "out_inside_input",
    "file",
    "zarr_option",
]


@pytest.mark.parametrize("case", CASES)
def test_refusals_are_one_line_exit_2_and_write_nothing(cli, tmp_path, fp32_tensors, case):
    argv, words = _variant(tmp_path, fp32_tensors, case)
    inputs = [Path(a) for a in argv if isinstance(a, Path) and a.exists()]
    before = {p: tree_digest(p) for p in inputs}
    out = Path(argv[argv.index("-o") + 1])
    existed = out.exists()
    code, stdout, err = cli("merge", *argv)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("fisherstore: error: "), err
    assert words in err, err
    assert {p: tree_digest(p) for p in inputs} == before  # inputs unchanged
    assert out.exists() == existed  # nothing created at -o (an input named as -o is still only that input)


def test_refusal_through_the_console_script(tmp_path, fp32_tensors):
    a = synthetic(tmp_path / "a", fp32_tensors)
    b = synthetic(tmp_path / "b", fp32_tensors, {"estimator": "sampled"})
    res = subprocess.run(
        [sys.executable, "-m", "fisherstore.cli.main", "merge", str(a), str(b), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "estimator differs" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_input_fails_naming_tensor_and_leaves_nothing(cli, tmp_path, fp32_tensors):
    a = synthetic(tmp_path / "a", fp32_tensors)
    b = synthetic(tmp_path / "b", fp32_tensors, {"num_prompts": 2})
    with open_store(b) as s:  # a tensor of the second group: the first group commits before the error
        name = next(n for n in s.names if s.info(n).group == 1)
        info = s.info(name)
    shard = b / info.location["file"]
    data = bytearray(shard.read_bytes())
    data[(info.location["offsets"][0] + info.location["offsets"][1]) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    before = tree_digest(b)
    with pytest.raises(ChecksumMismatchError, match=f"tensor '{name}'.*the manifest of {b}"):
        merge_stores([a, b], tmp_path / "api")
    assert not (tmp_path / "api").exists()
    code, _, err = cli("merge", a, b, "-o", tmp_path / "cli")
    assert code == 2 and name in err and str(b) in err and err.count("\n") == 1, err
    assert not (tmp_path / "cli").exists() and tree_digest(b) == before


def test_weights_are_prompt_counts_and_same_digest_warns(tmp_path, fp32_tensors, caplog):
    other = fisher_like_tensors(tiny_gemma4_config(), dtype=torch.float32, seed=1)
    a = synthetic(tmp_path / "a", fp32_tensors, {"num_prompts": 1, "prompts_sha256": "sha256:same"})
    b = synthetic(tmp_path / "b", other, {"num_prompts": 3, "prompts_sha256": "sha256:same"}, backend="zarr")
    with caplog.at_level(logging.WARNING, logger="fisherstore.merging"):
        summary = merge_stores([a, b], tmp_path / "out", to="zarr")
    assert "same prompt-set digest" in caplog.text
    got = tensors_of(Path(summary.store))
    for n, t in fp32_tensors.items():
        expected = (t * 1 + other[n] * 3) / 4
        torch.testing.assert_close(got[n], expected, rtol=1e-6, atol=0)
        assert not torch.allclose(got[n], (t + other[n]) / 2, rtol=1e-3)  # not an unweighted mean


def test_overwrite_and_help(cli, tmp_path, fp32_tensors):
    a = synthetic(tmp_path / "a", fp32_tensors)
    b = synthetic(tmp_path / "b", fp32_tensors, {"num_prompts": 2})
    out = synthetic(tmp_path / "old", fp32_tensors, {"num_prompts": 9})
    before = tree_digest(out)
    code, _, err = cli("merge", a, b, "-o", out)
    assert code == 2 and "--overwrite" in err and tree_digest(out) == before
    code, stdout, _ = cli("merge", a, b, "-o", out, "--overwrite", "--json")
    assert code == 0 and json.loads(stdout)["num_prompts"] == 6
    with open_store(out) as s:
        assert s.manifest.provenance["num_prompts"] == 6
    code, stdout, _ = cli("merge", "--help")
    assert code == 0 and "examples:" in stdout and "num_prompts" in stdout and "fisherstore merge" in stdout


def _merge_killed_after_group_0(tmp_path, tensors):
    """Inputs a, b and a merge into ``out`` SIGKILLed (in a forked child) before it could commit group 1.

    The kill point is the uninterrupted run's write count less 4: the final manifest save and
    ``layer_importance.json`` are two durable writes each (fsync, directory fsync), so the kill comes right
    after group 1's shard is durable and before the manifest names it.
    """
    a = synthetic(tmp_path / "a", tensors)
    b = synthetic(tmp_path / "b", tensors, {"num_prompts": 2})
    out = tmp_path / "out"
    writes = count_writes(["merge", a, b, "-o", tmp_path / "ref" / "out"], tmp_path, fork=True)
    rc, err = killed_run(["merge", a, b, "-o", out], writes - 4, fork=True)
    assert rc == -signal.SIGKILL, err
    return a, b, out, tmp_path / "ref" / "out"


def test_killed_merge_resumes_to_the_uninterrupted_store(cli, tmp_path, fp32_tensors):
    """A real SIGKILL leaves a store that says incomplete; --resume keeps group 0 and equals an uninterrupted run."""
    a, b, out, ref = _merge_killed_after_group_0(tmp_path, fp32_tensors)
    with open_store(out) as s:
        assert not s.complete and s.manifest.missing_groups == [1]
        kept = {out / s.info(n).location["file"] for n in s.names if s.info(n).group == 0}
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept}
    assert len(stamps) == 1
    before = (tree_digest(a), tree_digest(b))
    code, _, err = cli("merge", a, b, "-o", out)  # without --resume: refused, the store left as it is
    assert code == 2 and "already exists" in err and "--resume" in err, err
    code, _, err = cli("merge", a, b, "-o", out, "--resume")
    assert code == 0, err
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == stamps  # group 0 was not rewritten
    assert same_result(out, ref) == "" and verify(out) == []
    assert (tree_digest(a), tree_digest(b)) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no debris beside out


def test_resume_refuses_other_inputs_or_order_in_one_line(cli, tmp_path, fp32_tensors):
    a, b, out, _ = _merge_killed_after_group_0(tmp_path, fp32_tensors)
    c = synthetic(tmp_path / "c", fp32_tensors, {"num_prompts": 2})  # b's tensors and count, another path
    other = synthetic(tmp_path / "d", fisher_like_tensors(tiny_gemma4_config(), dtype=torch.float32, seed=3))
    before = tree_digest(out)
    for argv, words in (
        ([b, a], "in that order"),
        ([a, c], f"was merged from {a.resolve()}, {b.resolve()};"),
        ([a, b, c], "give the same inputs in the same order, or pass --overwrite"),
    ):
        code, stdout, err = cli("merge", *argv, "-o", out, "--resume")
        assert code == 2 and stdout == "" and err.count("\n") == 1 and words in err, err
        assert tree_digest(out) == before
    shutil.copytree(other, tmp_path / "b2")  # an input changed in place since: its tensors differ
    shutil.rmtree(b)
    shutil.copytree(tmp_path / "b2", b)
    (b / "fisherstore.json").write_text(
        (b / "fisherstore.json").read_text().replace('"num_prompts": 4', '"num_prompts": 2')
    )
    code, _, err = cli("merge", a, b, "-o", out, "--resume")
    assert code == 2 and f"another version of {b.resolve()}" in err, err
    code, _, err = cli("merge", a, c, "-o", other, "--resume")  # not a merge's output
    assert code == 2 and "not the output of a merge" in err, err
    code, _, err = cli("merge", a, b, "-o", out, "--resume", "--overwrite")
    assert code == 2 and "contradict" in err, err
    assert tree_digest(out) == before


def test_merge_kill_trials_rerun_bit_identical(tmp_path, fp32_tensors):
    """Three real kill points (first write, middle, last) of a merge, each rerun with --resume."""
    a = synthetic(tmp_path / "a", fp32_tensors)
    b = synthetic(tmp_path / "b", fp32_tensors, {"num_prompts": 2})
    report = run_kill_trials(
        "merge", lambda d: ["--no-fsync", "merge", a, b, "-o", d], tmp_path / "trials", name="out", points=3,
        resume_flag="--resume", fork=True,
    )  # fmt: skip
    counts = report.counts()
    assert counts["trials"] == counts["killed"] == 3, report.to_dict()
    bad = {k: counts[k] for k in ("debris_left", "wrong_complete", "mismatches", "source_changed")}
    assert bad == dict.fromkeys(bad, 0), [t.note for t in report.trials]
    assert counts["incomplete_after_kill"] >= 1 and counts["complete_after_kill"] == 1
