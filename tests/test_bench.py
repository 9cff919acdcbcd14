"""The benchmark suite (`python -m specdec.bench`): pure statistics, prompt files, the shipped held-out set,
and quick end-to-end CLI runs on the small synthetic FP8 checkpoint (no timings are asserted)."""

from __future__ import annotations

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.bench.__main__ import main as bench_main
from specdec.bench.common import PLAIN, BenchError, Shape, batches, paired_speedup, parse_shapes, timed_runs
from specdec.bench.prompt_set import HELDOUT_FILE, PromptFileError, load_prompt_file
from specdec.bench.figures import figures_table
from specdec.bench.stats import compare_outputs, conditional_acceptance, percentile, pool
from specdec.engine import GenerationStats

REPO = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--num-prompts", "2", "--max-new-tokens", "6"]


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- pure functions


def test_conditional_acceptance() -> None:
    assert conditional_acceptance([]) == []
    assert conditional_acceptance([0.8, 0.4, 0.1]) == pytest.approx([0.8, 0.5, 0.25])
    assert conditional_acceptance([0.5, 0.0, 0.0]) == [0.5, 0.0, None]  # position 3 never reached


def test_pool_weights_rates_by_row_steps() -> None:
    a = GenerationStats(tokens=30, verify_steps=10, tau=3.0, acceptance_per_position=[1.0, 1.0], tokens_per_s=30,
                        wall_s=1.0, draft_acceptance_rate=1.0, row_steps=10, ttft_s=0.1, tpot_s=[0.01] * 28,
                        rows_steps=[[0, 2], [], [0, 3, 5]])
    b = GenerationStats(tokens=10, verify_steps=30, tau=1.0, acceptance_per_position=[0.0, 0.0], tokens_per_s=10,
                        wall_s=3.0, draft_acceptance_rate=0.0, row_steps=30, ttft_s=0.3, tpot_s=[0.03] * 8,
                        rows_steps=[[0, 1, 4], [0, 0, 0, 7]])
    p = pool([a, b])
    assert p["tokens"] == 40 and p["wall_s"] == 4.0 and p["tokens_per_s"] == 10.0 and p["row_steps"] == 40
    assert p["tau"] == pytest.approx((3 * 10 + 1 * 30) / 40)
    assert p["acceptance_unconditional"] == pytest.approx([0.25, 0.25])
    assert p["acceptance_conditional"] == pytest.approx([0.25, 1.0])
    assert p["draft_acceptance_rate"] == pytest.approx(0.25)
    assert p["ttft_mean_ms"] == pytest.approx(200.0)
    assert p["tpot_p50_ms"] == pytest.approx(10.0) and p["tpot_samples"] == 36
    assert p["rows_steps"] == [[0, 3, 4], [0, 0, 0, 7], [0, 3, 5]]  # [depth][live rows], summed
    plain = pool([GenerationStats(tokens=5, wall_s=0.5, tau=1.0, ttft_s=0.1, tpot_s=[0.1] * 4)])
    assert plain["tau"] == 1.0 and plain["acceptance_unconditional"] == [] and plain["draft_acceptance_rate"] is None


class _DriftingEngine:
    """A stand-in engine whose machine slows down call by call (the n-th call takes 1 + n/4 units):
    a chain-2 call does its work in half the time a plain call does at the same moment."""

    compiled = None

    def __init__(self) -> None:
        self.calls: list[str] = []

    def generate(self, rows, *, max_new_tokens, temperature, top_p, seed, spec, max_batch=None):
        from types import SimpleNamespace

        label = "plain" if spec is None else f"chain {spec.depth}"
        slowdown = 1 + len(self.calls) / 4
        self.calls.append(label)
        wall = slowdown * (1.0 if spec is None else 0.5)
        tokens = max_new_tokens * len(rows)
        stats = GenerationStats(tokens=tokens, wall_s=wall, prefill_s=0.1 * wall, decode_s=0.9 * wall,
                                tau=1.0, ttft_s=0.1 * wall, tpot_s=[wall / tokens] * tokens)
        return SimpleNamespace(stats=stats, token_ids=[[seed] * max_new_tokens for _ in rows])


def test_timed_runs_interleave_and_pair_the_ratios() -> None:
    eng = _DriftingEngine()
    chain = Shape("chain", 2, 1, 2)
    seen: list[str] = []
    plain, drafted = timed_runs(eng, [[[1]], [[2]]], [PLAIN, chain], max_new_tokens=4, repeats=3, on_call=seen.append)
    # warm-up of each, then rounds of every shape over call 0, then over call 1, each call and each
    # round starting one shape later
    pc, cp = ["plain", "chain 2"], ["chain 2", "plain"]
    assert eng.calls == pc + pc + cp + cp + pc + pc + cp
    assert seen == ["plain warm-up", "chain 2 warm-up"] + [f"{k} round {r}/3" for r, order in
                                                           ((1, ("plain", "chain 2")), (2, ("chain 2", "plain")),
                                                            (3, ("plain", "chain 2"))) for k in order]
    assert plain.stats["repeats"] == 3 and len(plain.stats["tokens_per_s_repeats"]) == 3
    assert plain.token_ids == [[0] * 4, [1] * 4]  # call i is seeded seed + i
    # the machine slows down steadily from call to call; alternating the order call by call cancels
    # that drift in each round's ratio (round by round it came out near 1.5, sequentially near 1.0)
    assert paired_speedup(drafted, plain) == pytest.approx(2.0)
    assert paired_speedup(drafted, plain) == pytest.approx(paired_speedup(drafted, plain, "decode_tokens_per_s"))
    assert paired_speedup(plain, plain) == 1.0
    with pytest.raises(ValueError, match="rounds"):
        paired_speedup(drafted, timed_runs(eng, [[[1]]], [PLAIN], max_new_tokens=4, repeats=1)[0])


def test_percentile_and_compare_outputs() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 90) == pytest.approx(4.6)
    same = compare_outputs([[1, 2], [3]], [[1, 2], [3]])
    assert same["equal"] and same["identical_token_share"] == 1.0 and same["first_mismatch"] is None
    diff = compare_outputs([[1, 2, 9, 9], [3]], [[1, 2, 3, 4], [3]])
    assert not diff["equal"] and diff["identical_rows"] == 1
    assert diff["identical_token_share"] == pytest.approx(3 / 5) and diff["first_mismatch"] == (0, 2)


def test_shapes_and_batches() -> None:
    shapes = parse_shapes("1,2", "3x2x6,4x2,auto,3x1")
    assert [s.key for s in shapes] == ["chain 1", "chain 2", "tree 3x2x6", "tree 4x2x8", "auto", "chain 3"]
    assert shapes[2].spec().n_nodes == 6 and shapes[0].spec().topk == 1 and Shape("plain").spec() is None
    for bad in ("3x2x99", "3y2", "4"):
        with pytest.raises(BenchError, match="--trees"):
            parse_shapes("", bad)
    vocab = parse_shapes("2@2048", "3x2x6@1024,auto@512")
    assert [s.key for s in vocab] == ["chain 2 @2048", "tree 3x2x6 @1024", "auto @512"]
    assert vocab[0].spec().draft_vocab == 2048 and vocab[1].spec().draft_vocab == 1024
    for chains, trees in (("2@", ""), ("2@x", ""), ("", "3x2x6@0")):
        with pytest.raises(BenchError, match="draft vocabulary"):
            parse_shapes(chains, trees)
    ids = [[1], [2], [3]]
    assert batches(ids, 2) == [[[1], [2]], [[3], [1]]]
    assert batches(ids, 4) == [[[1], [2], [3], [1]]]


# ----------------------------------------------------------------------------- prompt files


def test_prompt_files(tmp_path: Path) -> None:
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"id": "a", "prompt": "def f(x):\\n    return"}\n\n{"prompt": "class A:"}\n')
    got = load_prompt_file(jl)
    assert [p.prompt for p in got] == ["def f(x):\n    return", "class A:"] and got[0].id == "a"
    txt = tmp_path / "p.txt"
    txt.write_text("def g():\n\n  \nclass B:\n")
    assert [p.prompt for p in load_prompt_file(txt)] == ["def g():", "class B:"]
    bad = {"empty.jsonl": "", "blank.txt": "\n  \n", "broken.jsonl": "{not json\n", "noprompt.jsonl": '{"text": 1}\n'}
    for name, content in bad.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(PromptFileError) as e:
            load_prompt_file(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompt_file(tmp_path / "missing.txt")


def test_cli_rejects_empty_prompt_file_in_one_line(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert bench_main(["latency", "--prompt-file", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error:") and str(empty) in err[0]
    assert not (tmp_path / "out").exists()


def test_shipped_heldout_prompts_are_held_out() -> None:
    from specdec.mtp.data import HELDOUT_PACKAGE, read_texts, split_files, stdlib_root

    lines = HELDOUT_FILE.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) >= 32
    assert len({r["id"] for r in records}) == len(records)
    root = stdlib_root()
    train, heldout = split_files(root)
    train_rel = {p.relative_to(root).as_posix() for p in train}
    heldout_rel = {p.relative_to(root).as_posix() for p in heldout}
    for r in records:
        assert set(r) == {"id", "source", "prompt"}
        assert r["prompt"].startswith(("def ", "class ")) and 150 <= len(r["prompt"]) <= 300
        path = f"{HELDOUT_PACKAGE}/{r['source']}"
        assert path not in train_rel
        if heldout_rel:  # a Python without its test suite cannot say more
            assert path in heldout_rel
    training = "\0".join(read_texts(train))
    assert not [r["id"] for r in records if r["prompt"] in training]
    assert [p.prompt for p in load_prompt_file(HELDOUT_FILE)] == [r["prompt"] for r in records]


def test_packaging_and_collection_settings() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "prompts/*.jsonl" in cfg["tool"]["setuptools"]["package-data"]["specdec.bench"]
    assert any(d.startswith("matplotlib") for d in cfg["project"]["optional-dependencies"]["bench"])
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]  # bench/perf is not collected


def test_gpu_scripts_parse() -> None:
    for script in ("gpu_kernels.py", "gpu_bench.py"):
        py_compile.compile(str(REPO / "bench" / script), doraise=True, cfile=None)
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")], check=True)


@pytest.mark.parametrize("what, args", [
    ("verify", ["--nodes", "1,4", "--batches", "1,2"]),
    ("graphs", ["--graph-batches", "1,2"]),
    ("invariant", ["--batches", "1,2"]),
])
def test_gpu_bench_runs_on_the_cpu(what: str, args: list[str], tmp_path: Path) -> None:
    """The GPU bench's model-level steps, run on the CPU (`--cpu-dry-run`), exercise the script's
    own logic before a GPU does: its verify timing once left the lengths one slot past the views it
    verified over, first seen on an H200."""
    out = tmp_path / f"{what}.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_bench.py"), what, "--cpu-dry-run", *args,
                          "--max-new-tokens", "8", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-1500:] + run.stderr[-1500:]
    assert json.loads(out.read_text())


# ----------------------------------------------------------------------------- end to end


def _read(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert set(data) >= {"benchmark", "machine", "settings", "rows", "failures"}
    assert set(data["machine"]) >= {"platform", "cpu", "cores", "torch", "transformers", "torch_threads", "git_commit"}
    assert (out / f"{name}.md").read_text().startswith("## ")
    pngs = sorted(out.glob(f"{name}_*.png"))
    if has_matplotlib():
        assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files
    return data


def test_cli_latency_quick(fp8_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["latency", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--batch-sizes", "1,2",
            "--trees", "2x2x4,auto"]
    assert bench_main(args) == 0
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "| decode speedup |" in printed
    data = _read(out, "latency")
    rows = data["rows"]
    assert {(r["batch_size"], r["config"]) for r in rows} == {
        (b, c) for b in (1, 2) for c in ("plain", "adaptive 2", "chain 1", "chain 2", "tree 2x2x4", "auto")}
    for r in rows:
        if r["kind"] == "adaptive":
            assert len(r["depth_steps"]) == 3 and sum(r["depth_steps"]) > 0
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["ttft_mean_ms"] > 0 and r["decode_speedup"] > 0
        if r["kind"] == "plain":
            assert r["speedup"] == r["decode_speedup"] == 1.0 and r["equal_to_plain"] is None and r["tau"] == 1.0
        else:
            assert r["equal_to_plain"] is True and r["tau"] >= 1.0
    assert sum(r["best_chain"] for r in rows) == 2
    assert data["failures"] == []
    table = figures_table([out]).splitlines()  # the README's figures table, generated from this JSON
    assert table[0].startswith("Machine: ") and data["machine"]["cpu"] in table[0]
    assert len(table) == 4 + 2 and table[4].startswith("| greedy | 1 |") and "(chain " in table[5]


def test_cli_latency_ceiling(fp8_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["latency", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--batch-sizes", "2",
            "--chains", "a2,1,3", "--trees", "2x2x4", "--ceiling"]
    assert bench_main(args) == 0
    assert "| ceiling |" in capsys.readouterr().out
    rows = {r["config"]: r for r in _read(out, "latency")["rows"]}
    assert {c: r["verify_width"] for c, r in rows.items()} == {"plain": 1, "adaptive 2": 3, "chain 1": 2,
                                                               "chain 3": 4, "tree 2x2x4": 5}
    assert rows["plain"]["verify_cost"] == 1.0 and rows["plain"]["ceiling"] == 1.0
    for r in rows.values():
        assert r["verify_ms"] > 0
        assert r["ceiling"] == pytest.approx(r["tau"] / r["verify_cost"])
        assert r["verify_cost"] == pytest.approx(r["verify_ms"] / rows["plain"]["verify_ms"])
    # whole steps as the eager loop runs them (`decoder_step_costs`), for chains and the adaptive row
    for config in ("adaptive 2", "chain 1", "chain 3"):
        r = rows[config]
        assert r["step_cost"] > 0 and r["step_bound"] == pytest.approx(r["tau"] / r["step_cost"])
    assert rows["plain"]["step_cost"] == 1.0 and "step_cost" not in rows["tree 2x2x4"]
    adaptive = rows["adaptive 2"]
    assert adaptive["rows_bound"] > 0 and rows["chain 3"]["rows_bound"] > 0 and "rows_bound" not in rows["plain"]
    assert (f"| {adaptive['step_bound']:.2f}× ({adaptive['rows_bound']:.2f}×) |"
            in figures_table([out]).splitlines()[4])


def test_cli_latency_continuous(fp8_ckpt: Path, tmp_path: Path, capsys) -> None:
    """`--continuous`: each configuration decodes every prompt in one call, B rows at once, and
    greedy MTP still equals plain decoding token for token."""
    out = tmp_path / "out"
    args = ["latency", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--batch-sizes", "1",
            "--chains", "a2,2", "--trees", "", "--continuous"]
    assert bench_main(args) == 0
    assert "one call of 2 prompts, 1 row(s) at once" in capsys.readouterr().out
    data = _read(out, "latency")
    assert data["settings"]["continuous"] is True and data["failures"] == []
    assert [r["calls"] for r in data["rows"]] == [1, 1, 1]
    assert all(r["equal_to_plain"] for r in data["rows"] if r["kind"] != "plain")


def test_cli_acceptance_quick(fp8_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["acceptance", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--trees", "2x2x4",
            "--temperatures", "0,1", "--batch-size", "2"]
    assert bench_main(args) == 0
    rows = _read(out, "acceptance")["rows"]
    assert {(r["temperature"], r["draft_mode"]) for r in rows} == {(0.0, "-"), (0.0, "onehot"), (1.0, "-"),
                                                                     (1.0, "onehot"), (1.0, "sample")}
    for r in rows:
        if r["kind"] == "plain":
            continue
        assert len(r["acceptance_unconditional"]) == r["depth"]
        assert r["acceptance_conditional"] == pytest.approx(conditional_acceptance(r["acceptance_unconditional"]))
        assert 0 <= r["draft_acceptance_rate"] <= 1 and r["row_steps"] > 0
        assert r["tau"] == pytest.approx(1 + sum(r["acceptance_unconditional"]), rel=1e-6)
        assert r["equal_to_plain"] is (True if r["temperature"] == 0 else None)


def test_cli_peers_quick(fp8_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    assert bench_main(["peers", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out)]) == 0
    data = _read(out, "peers")
    rows = data["rows"]
    assert [r["kind"] for r in rows] == ["specdec", "specdec-mtp", "transformers", "transformers-pld"]
    assert rows[0]["ratio_to_specdec_plain"] == 1.0 and rows[1]["equal_to_specdec_greedy"] is True
    for r in rows:
        assert r["tokens"] > 0 and 0.0 <= r["identical_token_share"] <= 1.0
        assert len(r["tokens_per_s_repeats"]) == 1 and r["ratio_to_transformers_generate"] > 0
    assert data["settings"]["float32_copy_of_fp8"] is True


def test_step_bound_is_tau_over_the_step_cost(monkeypatch) -> None:
    """Chains and the adaptive row's depths are timed as decoder steps against one plain step; an
    adaptive row's cost is the mean over the depths its steps ran; trees get none."""
    from specdec.bench import latency
    from specdec.bench.common import PLAIN, parse_shapes

    shapes = [PLAIN] + parse_shapes("1,2@64,a2", "2x2x4")
    seen = []

    def fake_costs(eng, ids, specs, *sampling):
        seen.append(([(s.depth, s.draft_vocab, s.adaptive) for s in specs], sampling))
        by_depth = {1: 0.030, 2: 0.040}
        return 0.020, [by_depth[s.depth] + (0.010 if s.draft_vocab else 0.0) for s in specs]

    monkeypatch.setattr(latency, "decoder_step_costs", fake_costs)
    rows = [{"kind": s.kind, "tau": t, "depth_steps": n}
            for s, t, n in zip(shapes, [1.0, 1.8, 2.5, 2.4, 2.9], [[], [], [], [2, 0, 6], []])]
    latency.add_step_bound(None, [[1, 2]], rows, shapes, 0.7, 0.9)
    assert seen == [([(1, None, False), (2, 64, False), (2, None, False)], (0.7, 0.9))]
    assert rows[0]["step_cost"] == 1.0 and rows[0]["step_ms"] == pytest.approx(20.0) and "step_bound" not in rows[0]
    assert rows[1]["step_cost"] == pytest.approx(1.5) and rows[1]["step_bound"] == pytest.approx(1.2)
    assert rows[2]["step_ms"] == pytest.approx(50.0) and rows[2]["step_bound"] == pytest.approx(1.0)
    assert rows[3]["step_cost"] == pytest.approx((2 * 1.0 + 6 * 2.0) / 8)  # d0 at 1 plain step, d2 at 2
    assert rows[3]["step_ms"] == pytest.approx(35.0) and rows[3]["step_bound"] == pytest.approx(2.4 / 1.75)
    assert "step_cost" not in rows[4]


def test_rows_bound_prices_each_step_at_the_rows_it_ran(monkeypatch) -> None:
    """Steps are timed on the first 1, 2, 4 rows of a 4-row batch; a step over 3 live rows costs
    the linear mean of 2 and 4; the bound is plain decoding's priced steps over the row's."""
    from specdec.bench import latency
    from specdec.bench.common import PLAIN, parse_shapes

    shapes = [PLAIN] + parse_shapes("2,a2", "")
    timed = []

    def fake_costs(eng, ids, specs, *sampling):  # seconds: 10 ms + 5 ms a row, a depth-d step (1 + d/2)x
        timed.append(len(ids))
        plain = 0.010 + 0.005 * len(ids)
        return plain, [plain * (1 + s.depth / 2) for s in specs]

    monkeypatch.setattr(latency, "decoder_step_costs", fake_costs)
    rows = [{"kind": "plain", "tau": 1.0, "depth_steps": [], "rows_steps": [[0, 0, 0, 0, 10]]},
            {"kind": "chain", "tau": 3.0, "depth_steps": [0, 0, 4], "rows_steps": [[], [], [0, 1, 0, 1, 2]]},
            {"kind": "adaptive", "tau": 2.5, "depth_steps": [1, 1, 3], "rows_steps": [[0, 0, 0, 0, 1], [0, 0, 0, 1],
                                                                                    [0, 0, 0, 0, 3]]}]
    latency.add_step_bound(None, [[1], [2], [3], [4]], rows, shapes, 0.0, 1.0)
    assert timed == [1, 2, 4]
    plain = {n: 0.010 + 0.005 * n for n in range(1, 5)}
    assert rows[0]["rows_step_s"] == pytest.approx(10 * plain[4]) and "rows_bound" not in rows[0]
    chain_s = 2 * (plain[1] + plain[3] + 2 * plain[4])
    assert rows[1]["rows_step_s"] == pytest.approx(chain_s)
    assert rows[1]["rows_bound"] == pytest.approx(10 * plain[4] / chain_s)
    adaptive_s = plain[4] + 1.5 * plain[3] + 3 * 2 * plain[4]
    assert rows[2]["rows_bound"] == pytest.approx(10 * plain[4] / adaptive_s)
    assert rows[1]["step_bound"] == pytest.approx(3.0 / 2.0)  # every step priced at all 4 rows


def test_cli_serve_quick(fp8_ckpt: Path, tmp_path: Path) -> None:
    """The serving bench against its own loopback server: closed loop and Poisson, plain and MTP."""
    out = tmp_path / "out"
    assert bench_main(["serve", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--rates", "20"]) == 0
    rows = _read(out, "serve")["rows"]
    assert [(r["config"], r["mode"]) for r in rows] == [
        ("plain", "closed 2 clients"), ("plain", "Poisson 20/s"), ("adaptive 3", "closed 2 clients"),
        ("adaptive 3", "Poisson 20/s"), ("adaptive 3, static batching", "closed 2 clients")]
    for r in rows:
        assert r["requests"] == 4 and r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert rows[0]["tau"] == 1.0 and rows[2]["tau"] >= 1.0
    assert rows[0]["tokens"] == rows[2]["tokens"] == rows[4]["tokens"]  # greedy: same outputs, same lengths


def test_cli_soak_quick(fp8_ckpt: Path, tmp_path: Path) -> None:
    """The soak against its own loopback server with a pool small enough to preempt: requests finish or
    are cancelled, none fails, every block comes back; the samples cover the run."""
    out = tmp_path / "out"
    assert bench_main(["soak", *TINY, "--ckpt-path", str(fp8_ckpt), "--out", str(out), "--minutes", "0.25",
                       "--rss-slack", "1.0"]) == 0
    rows = _read(out, "soak")["rows"]
    summary, samples = rows[0], rows[1:]
    assert summary["errors"] == 0 and summary["requests_done"] > 0 and summary["blocks_used_end"] == 0
    assert samples[-1]["running"] == samples[-1]["waiting"] == 0 and samples[-1]["t_s"] >= 15
    assert max(s["blocks_used"] for s in samples) > 0


def test_compile_break_even_counts_load_and_overhead() -> None:
    """Break-even: the new tokens after which the compiled process, its extra load and compile
    included, finishes first; none when compiling is not faster."""
    from specdec.bench.compile_cost import compare

    rows = [{"load_s": 5.0, "overhead_s": 0.0, "tokens_per_s": 100.0},
            {"load_s": 7.0, "overhead_s": 28.0, "tokens_per_s": 300.0},
            {"load_s": 5.0, "overhead_s": 10.0, "tokens_per_s": 90.0}]
    compare(rows)
    # 30 s extra; each token saves 1/100 - 1/300 s: 4,500 tokens
    assert rows[1]["break_even_tokens"] == pytest.approx(4500) and rows[1]["speedup"] == pytest.approx(3.0)
    assert rows[2]["break_even_tokens"] is None


def test_cli_compile_rejects_bad_batch_size(tmp_path: Path) -> None:
    assert bench_main(["compile", "--batch-size", "0", "--out", str(tmp_path)]) == 2


def test_perf_suite_runs(tmp_path: Path) -> None:
    """`pytest bench/perf` (not collected by `make test`) still runs against the current code: each
    micro-benchmark once, untimed, on the embedded model."""
    from tests.conftest import run_cli

    proc = run_cli(["-m", "pytest", "-q", "bench/perf", "--benchmark-disable", "-p", "no:cacheprovider"],
                   env={"SPECDEC_BENCH_ROUNDS": "1", "SPECDEC_CACHE": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
