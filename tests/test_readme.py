"""Every command the README shows parses: each `python -m MODULE ...` line in its bash blocks (and
bench/README.md's) is handed to that module's `main`, which must accept every flag as written.
Commands stop right after parsing, so nothing runs and placeholder paths are never opened."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", REPO / "bench" / "README.md"]


class Parsed(Exception):
    """Raised in place of running a command once its arguments parsed."""


def readme_commands() -> list[tuple[str, str, list[str]]]:
    """(doc, module, argv) of every `-m specdec...` command (the project's own, not pytest's) in the
    docs' ```bash blocks, with continuation lines joined and comments dropped."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if "-m" in words:
                    at = words.index("-m")
                    if words[at + 1].split(".")[0] == "specdec":
                        found.append((doc.name, words[at + 1], words[at + 2:]))
    return found


COMMANDS = readme_commands()


def test_the_readme_shows_the_main_commands():
    modules = {m for _, m, _ in COMMANDS}
    assert {"specdec.generate", "specdec.serve", "specdec.tune", "specdec.plan", "specdec.bench", "specdec.bench.figures",
            "specdec.model.convert", "specdec.model.fp8_cast_bf16", "specdec.model.synthetic"} <= modules


@pytest.mark.parametrize("doc,module,argv", COMMANDS, ids=[f"{d}:{m} {' '.join(a)}"[:90] for d, m, a in COMMANDS])
def test_readme_command_parses(doc, module, argv, monkeypatch):
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    if module == "specdec.bench.figures":  # reads its directories itself (no argparse): they must exist
        assert all((REPO / a / "latency.json").is_file() or a.startswith("results/") for a in argv)
        return
    main = importlib.import_module(module if module != "specdec.bench" else "specdec.bench.__main__").main
    with pytest.raises(Parsed):
        main(argv)
