"""``fisherstore extract`` under torchrun: 2 gloo ranks on CPU give the one-process store.

Tolerance: every element of a Fisher store is a mean of non-negative terms
(squared gradients), and each rank computes the same per-prompt gradients
as one process does (batch 1, one thread); only the order of the sum
changes (each rank's part, then the ranks' parts).  A sum of n non-negative
fp32 terms in any order is within (n - 1) * 2**-24 relative of the exact
sum, so the stores must agree to ``rtol=1e-6`` (5 prompts), with ``atol=0``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from fisherstore import open_store
from fisherstore.extraction import ExtractConfig, extract, target_parameters
from fisherstore.manifest import TensorSpec
from fisherstore.models import TINY_GEMMA4, load_model
from fisherstore.planning import ModelShape, plan_extraction
from fisherstore.prompts import encode_prompts, load_prompts

NUM_PROMPTS = 5  # odd: rank 0 takes prompts 0, 2, 4 and rank 1 prompts 1, 3
OPTIONS = {"max_length": 40, "dtype": "fp32", "group_size": 2}
CLI_OPTIONS = ["--num-prompts", str(NUM_PROMPTS), "--max-length", "40", "--dtype", "fp32", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in the one-process reference: the same kernels, the same sums

# Several extractions in one torchrun launch, the process group initialised by the caller (library use).
DRIVER = """\
import sys, torch, torch.distributed as dist
from fisherstore.extraction import ExtractConfig, extract
from fisherstore.models import load_model
from fisherstore.prompts import load_prompts
torch.set_num_threads(1)
dist.init_process_group("gloo")
tiny = load_model("tiny-gemma4")
for name in sys.argv[2:]:
    schedule, estimator = name.split("-")
    cfg = ExtractConfig(max_length=40, dtype="fp32", group_size=2, schedule=schedule, estimator=estimator)
    s = extract(tiny.model, tiny.tokenizer, load_prompts(limit=5), f"{sys.argv[1]}/{name}", cfg)
    sys.stdout.write(f"done {name} {s.rank} {s.world_size} {s.schedule}\\n")  # one write: the ranks share stdout
    sys.stdout.flush()
dist.destroy_process_group()
"""

# group_size="auto" under a budget that differs by rank, as free memory does: rank 0's plan must rule.
PLAN_DRIVER = """\
import json, sys, torch, torch.distributed as dist
from fisherstore.extraction import ExtractConfig, extract
from fisherstore.models import load_model
from fisherstore.prompts import load_prompts
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
tiny = load_model("tiny-gemma4")
cfg = ExtractConfig(max_length=40, dtype="fp32", group_size="auto", max_memory=int(sys.argv[2 + rank]))
s = extract(tiny.model, tiny.tokenizer, load_prompts(limit=5), sys.argv[1], cfg)
sys.stdout.write(f"plan {rank} {s.group_size} {s.groups_total} {json.dumps(s.plan.to_dict(), sort_keys=True)}\\n")
sys.stdout.flush()
dist.destroy_process_group()
"""
RANK_BUDGETS = (1_200_000, 1_000_000)  # bytes: the tiny model's auto group size is 2 under the first, 1 under the other


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY_GEMMA4)


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    """Stores of one process, by ``schedule-estimator`` (computed on first use)."""
    root = tmp_path_factory.mktemp("one")
    made: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str, **extra: object) -> dict[str, torch.Tensor]:
        if name not in made:
            schedule, estimator = name.split("-")
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cfg = ExtractConfig(**OPTIONS, schedule=schedule, estimator=estimator)  # type: ignore[arg-type]
                extract(tiny.model, tiny.tokenizer, load_prompts(limit=NUM_PROMPTS), root / name, cfg)
            finally:
                torch.set_num_threads(before)
            made[name] = _tensors(root / name)
        return made[name]

    return get


def _tensors(path) -> dict[str, torch.Tensor]:
    with open_store(path) as store:
        return {n: store[n] for n in store.names}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=0, msg=name)


def _provenance(path) -> dict:
    return json.loads((path / "fisherstore.json").read_text())["provenance"]


def _run(cmd: list[str], tmp_path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=ENV)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.mark.slow
def test_cli_two_ranks_equal_one_process(tmp_path, one_process):
    out = tmp_path / "two"
    cmd = [*TORCHRUN, "-m", "fisherstore.cli.main", "extract", TINY_GEMMA4, "--out", str(out), *CLI_OPTIONS]
    run = _run([*cmd, "--group-size", "2"], tmp_path)
    assert run.stdout.count("wrote ") == 1, run.stdout  # rank 0 alone reports (and writes)
    _assert_close(_tensors(out), one_process("pipelined-empirical"))
    prov = _provenance(out)
    assert (prov["world_size"], prov["dist_backend"], prov["num_prompts"]) == (2, "gloo", NUM_PROMPTS)
    assert prov["schedule"] == "pipelined"


def test_one_process_records_world_size_one(tmp_path, tiny):
    extract(tiny.model, tiny.tokenizer, load_prompts(limit=2), tmp_path / "s", ExtractConfig(**OPTIONS))  # type: ignore[arg-type]
    prov = _provenance(tmp_path / "s")
    assert (prov["world_size"], prov["dist_backend"]) == (1, None)


@pytest.mark.slow
def test_library_under_torchrun_naive_and_sampled(tmp_path, one_process):
    names = ["naive-empirical", "pipelined-sampled", "naive-sampled"]
    run = _run([*TORCHRUN, "--no-python", sys.executable, "-c", DRIVER, str(tmp_path), *names], tmp_path)
    for name in names:
        schedule = name.split("-")[0]
        assert f"done {name} 0 2 {schedule}" in run.stdout and f"done {name} 1 2 {schedule}" in run.stdout
        _assert_close(_tensors(tmp_path / name), one_process(name))
        prov = _provenance(tmp_path / name)
        assert (prov["world_size"], prov["dist_backend"], prov["estimator"]) == (2, "gloo", name.split("-")[1])
    # the sampled labels follow the global prompt index: not the empirical store, and not rank-dependent
    assert not torch.equal(
        _tensors(tmp_path / "naive-sampled")["model.layers.0.mlp.up_proj.weight"],
        _tensors(tmp_path / "naive-empirical")["model.layers.0.mlp.up_proj.weight"],
    )


@pytest.mark.slow
def test_resume_with_two_ranks_gives_the_same_store(tmp_path, tiny, one_process):
    whole = one_process("pipelined-empirical")
    out = tmp_path / "cut"
    calls = []

    def fail_in_group_1(module, args):  # pass 1 calls layer 1 once per prompt; group 1 (layers 0-1) re-runs it
        if not torch.is_grad_enabled():
            return  # the pipelined schedule's no-grad check of the layer chain, before the store is created
        calls.append(1)
        if len(calls) > NUM_PROMPTS:
            raise RuntimeError("interrupted")

    handle = tiny.model.model.layers[1].register_forward_pre_hook(fail_in_group_1)
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            extract(tiny.model, tiny.tokenizer, load_prompts(limit=NUM_PROMPTS), out, ExtractConfig(**OPTIONS))  # type: ignore[arg-type]
    finally:
        handle.remove()
    state = json.loads((out / "fisherstore.json").read_text())
    assert [g["complete"] for g in state["groups"]] == [False, True]
    kept = _tensors(out)
    cmd = [*TORCHRUN, "-m", "fisherstore.cli.main", "extract", TINY_GEMMA4, "--out", str(out), *CLI_OPTIONS]
    run = _run([*cmd, "--group-size", "2", "--resume", "--verbose"], tmp_path)
    assert "1 of 2 groups already complete" in run.stderr
    resumed = _tensors(out)
    _assert_close(resumed, whole)
    assert all(torch.equal(resumed[n], kept[n]) for n in kept)  # the complete group was kept, not rewritten
    assert _provenance(out)["world_size"] == 1  # the provenance is the run's that created the store


@pytest.mark.slow
def test_auto_group_size_is_rank_0s_plan_on_every_rank(tmp_path, tiny, one_process):
    """Each rank's own plan would differ (2 layers a group on rank 0, 1 on rank 1); both run rank 0's, recorded once."""
    specs = [TensorSpec(n, tuple(p.shape), "float32") for n, p in target_parameters(tiny.model).items()]
    tokens = [ids.shape[1] for ids in encode_prompts(tiny.tokenizer, load_prompts(limit=NUM_PROMPTS), max_length=40)]
    own = [
        plan_extraction(
            specs,
            ModelShape.of(tiny.model),
            tokens,
            schedule="pipelined",
            devices=[torch.device("cpu")],
            max_memory=budget,
        ).group_size
        for budget in RANK_BUDGETS
    ]
    assert own == [2, 1]  # so that ranks planning for themselves would run different groups
    out = tmp_path / "auto"
    budgets = [str(b) for b in RANK_BUDGETS]
    run = _run([*TORCHRUN, "--no-python", sys.executable, "-c", PLAN_DRIVER, str(out), *budgets], tmp_path)
    lines = sorted(line.split(" ", 4)[1:] for line in run.stdout.splitlines() if line.startswith("plan "))
    assert [line[0] for line in lines] == ["0", "1"], run.stdout
    (_, size0, total0, plan0), (_, size1, total1, plan1) = lines
    assert (size0, total0) == (size1, total1) == ("2", "2")
    assert plan1 == plan0  # rank 1 runs rank 0's plan: its group size and boundary placement
    plan = json.loads(plan0)
    assert (plan["group_size"], plan["source"], plan["budget_bytes"]) == (2, "auto", RANK_BUDGETS[0])
    assert plan["budget_source"] == "max_memory" and plan["boundary"] == "device"
    state = json.loads((out / "fisherstore.json").read_text())
    assert state["provenance"]["plan"] == plan  # the store, written by rank 0 alone, records that plan
    assert (state["provenance"]["group_size"], state["provenance"]["world_size"]) == (2, 2)
    assert [g["index"] for g in state["groups"]] == [0, 1] and all(g["complete"] for g in state["groups"])
    _assert_close(_tensors(out), one_process("pipelined-empirical"))  # group_size 2 in one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_bad_out_on_rank_0_exits_2_on_every_rank(tmp_path):
    """Only rank 0 opens --out; its refusal reaches rank 1, and both exit 2 (a hang would time out)."""
    out = tmp_path / "taken"
    out.write_text("not a store")
    port = str(_free_port())
    cmd = [sys.executable, "-m", "fisherstore.cli.main", "extract", TINY_GEMMA4, "--out", str(out), *CLI_OPTIONS]
    procs = []
    start = time.monotonic()
    for rank in range(2):  # what torchrun sets, so that each rank's exit code is seen on its own
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    seconds = time.monotonic() - start
    assert [p.returncode for p in procs] == [2, 2], errs
    assert "already exists" in errs[0] and "--overwrite" in errs[0], errs[0]
    assert "extract failed on rank 0:" in errs[1] and "--overwrite" in errs[1], errs[1]
    assert out.read_text() == "not a store"  # nothing written
    assert seconds < 120
