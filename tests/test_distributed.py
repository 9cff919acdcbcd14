"""torchrun with 2 ranks (gloo, CPU) gives the same logits and tokens as one process; so does a pre-sharded copy."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.model.convert import convert
from tests.conftest import run_cli

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _dump(ckpt, out, ranks: int) -> dict:
    args = (TORCHRUN if ranks == 2 else []) + ["tests/dist_logits.py", str(ckpt), str(out)]
    proc = run_cli(args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(fp8_ckpt, tmp_path_factory):
    return _dump(fp8_ckpt, tmp_path_factory.mktemp("d") / "one.json", 1)


def _assert_same(a: dict, b: dict) -> None:
    torch.testing.assert_close(torch.tensor(a["logits"]), torch.tensor(b["logits"]), rtol=1e-4, atol=1e-4)
    assert a["greedy"] == b["greedy"]
    assert a["sampled"] == b["sampled"]
    assert a["spec_greedy"] == b["spec_greedy"] == a["greedy"]  # lossless across ranks too
    assert a["spec_sampled"] == b["spec_sampled"]  # lockstep draws: every rank decides the same
    assert a["spec_tree"] == b["spec_tree"] == a["greedy"]
    assert a["spec_tree_sampled"] == b["spec_tree_sampled"]
    assert a["spec_adaptive"] == b["spec_adaptive"] == a["greedy24"]  # depths switched, same tokens
    assert sum(b["adaptive_depth_steps"]) > 0
    assert all(len(row) == 12 for row in b["spec_adaptive_sampled"])  # ranks agreed on every step's depth


def test_two_ranks_match_one_process(fp8_ckpt, single, tmp_path):
    two = _dump(fp8_ckpt, tmp_path / "two.json", 2)
    assert two["world_size"] == 2 and single["world_size"] == 1
    _assert_same(single, two)


def test_presharded_checkpoint_matches(fp8_ckpt, single, tmp_path):
    sharded = convert(fp8_ckpt, tmp_path / "mp2", 2)
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == ["model0-mp2.safetensors",
                                                                     "model1-mp2.safetensors"]
    _assert_same(single, _dump(sharded, tmp_path / "conv.json", 2))


def test_presharded_checkpoint_refuses_other_world_size(fp8_ckpt, tmp_path):
    sharded = convert(fp8_ckpt, tmp_path / "mp2", 2)
    proc = run_cli(["-m", "specdec.generate", "--ckpt-path", str(sharded), "--prompt", "x"])
    assert proc.returncode == 2 and "pre-sharded for world size 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_under_torchrun_prints_once_and_matches(fp8_ckpt, tmp_path):
    common = ["--ckpt-path", str(fp8_ckpt), "--prompt", "def f(x):", "--prompt", "import os",
              "--max-new-tokens", "10"]
    one = run_cli(["-m", "specdec.generate", *common, "--json", str(tmp_path / "1.json")])
    two = run_cli([*TORCHRUN, "-m", "specdec.generate", *common, "--json", str(tmp_path / "2.json")], timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count(">>> def f(x):") == 1, two.stdout  # only rank 0 prints
    r1, r2 = (json.loads((tmp_path / f).read_text()) for f in ("1.json", "2.json"))
    assert [r["token_ids"] for r in r1["results"]] == [r["token_ids"] for r in r2["results"]], (r1, r2)


def test_scheduler_followers_replay_rank0_in_lockstep(fp8_ckpt, tmp_path):
    """Under torchrun rank 0 schedules (joins, leaves, chunked prefill, preemption, a cancel, adaptive
    depths) and rank 1 replays its rounds: both ranks' copies of every sequence emit the same tokens,
    greedy ones equal decoding the prompt alone, sampled ones equal it exactly."""
    out = tmp_path / "sched.json"
    proc = run_cli([*TORCHRUN, "tests/dist_scheduler.py", str(fp8_ckpt), str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rank0, rank1 = r["ranks"]
    assert r["world_size"] == 2 and rank0 == rank1
    assert r["preemptions"] > 0 and sum(r["depth_steps"]) > 0
    assert max(r["prompt_lens"]) > 8  # longer than the prefill budget: chunked
    for i, (output, reason, _) in enumerate(rank0):
        if i == 1:  # cancelled by its client after 3 tokens
            assert reason == "cancelled" and 3 <= len(output) < 30 and output == r["alone"][i][:len(output)]
        else:
            assert output == r["alone"][i] and reason == "length"


# ---------------------------------------------------------------------- device binding (no GPU needed)

@pytest.mark.parametrize("device, local_rank, world, gpus, expected", [
    ("cpu", 3, 4, 0, "cpu"),
    ("cuda", 0, 1, 1, "cuda:0"),
    ("cuda:2", 0, 1, 4, "cuda:2"),      # one process may pick any GPU
    ("cuda", 5, 8, 8, "cuda:5"),        # torchrun: rank r of the node on GPU r
    ("cuda:5", 5, 8, 8, "cuda:5"),
    ("cuda", 5, 8, 1, "cuda:0"),        # each rank sees only its own GPU (CUDA_VISIBLE_DEVICES)
])
def test_each_rank_runs_on_its_own_gpu(device, local_rank, world, gpus, expected):
    from specdec.distributed import rank_device
    assert rank_device(torch.device(device), local_rank, world, gpus) == torch.device(expected)


@pytest.mark.parametrize("device, local_rank, world, gpus, message", [
    ("cuda:0", 1, 2, 2, "rank 1 on this node must run on cuda:1"),   # every rank on GPU 0: the bug it prevents
    ("cuda", 8, 16, 8, "LOCAL_RANK=8 but this process sees only 8 GPU"),
    ("cuda", 0, 1, 0, "no CUDA device"),
])
def test_a_wrong_gpu_for_a_rank_is_refused(device, local_rank, world, gpus, message):
    from specdec.model.errors import ConfigError
    from specdec.distributed import rank_device
    with pytest.raises(ConfigError, match=message):
        rank_device(torch.device(device), local_rank, world, gpus)


def test_binding_sets_the_current_gpu_and_hands_it_to_nccl(monkeypatch):
    """What the CPU can prove of CUDA binding: `bind_device` makes the rank's GPU current (Triton
    launches and `broadcast_object_list` use it) and the NCCL group is created with that `device_id`."""
    import torch.distributed as dist

    from specdec import distributed
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("init", (backend, kw)))
    device = distributed.bind_device(torch.device("cuda"))
    ctx = distributed.init_parallel(device)
    assert device == torch.device("cuda", 2) == calls["set_device"]
    backend, kw = calls["init"]
    assert backend == "nccl" and kw["device_id"] == torch.device("cuda", 2)
    assert (ctx.rank, ctx.world_size) == (6, 4)
    assert distributed.bind_device(torch.device("cpu")) == torch.device("cpu")  # the CPU binds nothing


def test_batch_invariant_mode_over_two_ranks_sums_in_rank_order(fp8_ckpt, tmp_path):
    """Under torchrun with 2 ranks the batch-invariant mode's sums over ranks go in rank order, so a
    verified chain's bf16 logits still equal its tokens decoded alone and greedy MTP equals plain."""
    out = tmp_path / "invariant.json"
    proc = run_cli(TORCHRUN + ["tests/dist_invariant.py", str(fp8_ckpt), str(out)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = json.loads(out.read_text())
    assert dump["world_size"] == 2 and dump["ordered_sums"]
    assert dump["logits_equal"]
    assert dump["chain"] == dump["plain"]
