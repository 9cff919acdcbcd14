"""The `specdec.generate` command line: inputs, JSON output, interactive mode, and bad input."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

STATS_KEYS = {"tokens", "verify_steps", "tau", "acceptance_per_position", "tokens_per_s", "wall_s"}


def gen(ckpt, *args, **kw):
    return run_cli(["-m", "specdec.generate", "--ckpt-path", str(ckpt), *args], **kw)


def assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


def test_prompts_and_json(fp8_ckpt, tmp_path):
    out = tmp_path / "r.json"
    proc = gen(fp8_ckpt, "--prompt", "def f(x):", "--prompt", "import", "--max-new-tokens", "6", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert ">>> def f(x):" in proc.stdout and "tok/s" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["prompt"] for r in data["results"]] == ["def f(x):", "import"]
    assert all(0 < len(r["token_ids"]) <= 6 and isinstance(r["completion"], str) for r in data["results"])
    assert STATS_KEYS <= set(data["stats"])
    assert data["stats"]["tokens"] == sum(len(r["token_ids"]) for r in data["results"])
    assert not list(tmp_path.glob(".r.json.*"))  # no temp file left behind


def test_input_file_and_sampling_is_seeded(fp8_ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("class A:\n\nfor i in\n")
    runs = []
    for i in range(2):
        out = tmp_path / f"{i}.json"
        proc = gen(fp8_ckpt, "--input-file", str(prompts), "--temperature", "0.8", "--top-p", "0.9",
                   "--seed", "3", "--max-new-tokens", "8", "--json", str(out))
        assert proc.returncode == 0, proc.stderr
        runs.append([r["token_ids"] for r in json.loads(out.read_text())["results"]])
    assert len(runs[0]) == 2 and runs[0] == runs[1]


def test_interactive_clear_and_exit(fp8_ckpt):
    proc = gen(fp8_ckpt, "--interactive", "--max-new-tokens", "4", input="hello\n/clear\nagain\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") >= 3


def test_interactive_ends_on_eof(fp8_ckpt):
    proc = gen(fp8_ckpt, "--interactive", "--max-new-tokens", "2", input="hi\n")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-batch", "0"], "--max-batch"),
    (["--draft-depth", "0"], "--draft-depth"),
    (["--tree-nodes", "1", "--draft-depth", "3"], "--tree-nodes"),
    (["--tree-topk", "0"], "--tree-topk"),
    (["--tree-topk", "2", "--tree-nodes", "50"], "full tree"),
    (["--draft-mode", "greedy"], "--draft-mode"),
    (["--compare", "--spec", "none"], "--compare"),
    (["--spec", "eagle"], "--spec"),
    (["--bogus"], "--bogus"),
    (["--batch-invariant", "--compile"], "--batch-invariant and --compile"),
])
def test_bad_flags(fp8_ckpt, flags, needle):
    assert_one_line_error(gen(fp8_ckpt, "--prompt", "x", *flags), needle)


def test_bad_input_files(fp8_ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(gen(fp8_ckpt, "--input-file", str(empty)), "empty")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\n\xff\xfe\x00bad\n")
    assert_one_line_error(gen(fp8_ckpt, "--input-file", str(binary)), "UTF-8")
    assert_one_line_error(gen(fp8_ckpt, "--input-file", str(tmp_path / "none.txt")), "not found")


def test_prompt_longer_than_max_seq_len(fp8_ckpt, tmp_path):
    out = tmp_path / "never.json"
    proc = gen(fp8_ckpt, "--prompt", "x " * 40, "--max-seq-len", "32", "--max-new-tokens", "8", "--json", str(out))
    assert_one_line_error(proc, "maximum sequence length 32")
    assert not out.exists()


def test_json_into_missing_directory(fp8_ckpt, tmp_path):
    proc = gen(fp8_ckpt, "--prompt", "x", "--max-new-tokens", "2", "--json", str(tmp_path / "no" / "r.json"))
    assert_one_line_error(proc, "does not exist")


def test_compare_reports_both_and_the_speedup(fp8_ckpt, tmp_path):
    out = tmp_path / "c.json"
    proc = gen(fp8_ckpt, "--prompt", "def f(x):", "--compare", "--draft-depth", "2", "--max-new-tokens", "8",
               "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout and "identical outputs: 1/1" in proc.stdout
    data = json.loads(out.read_text())
    assert data["speedup"] > 0 and STATS_KEYS <= set(data["plain"])
    assert len(data["stats"]["acceptance_per_position"]) == 2


def test_batch_invariant_compare_is_identical(fp8_ckpt):
    proc = gen(fp8_ckpt, "--prompt", "def f(x):", "--batch-invariant", "--compare", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "identical outputs: 1/1" in proc.stdout


def test_spec_mtp_without_mtp_layer(tmp_path):
    from specdec.model.synthetic import small_config, write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path / "nomtp", small_config(num_nextn_predict_layers=0))
    assert_one_line_error(gen(ckpt, "--prompt", "x", "--spec", "mtp"), "no MTP layer")
    proc = gen(ckpt, "--prompt", "x", "--max-new-tokens", "2")  # default: plain when there is no MTP layer
    assert proc.returncode == 0 and "[plain:" in proc.stdout
