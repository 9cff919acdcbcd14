"""Benchmark prompts: the shipped held-out set, or any file given with `--prompt-file`.

* `.jsonl` / `.ndjson`: one JSON object per non-blank line with a string field "prompt" (other
  fields are kept: "id", "source", ...).
* anything else (e.g. `.txt`): UTF-8 text, one prompt per non-blank line.

A missing, unreadable, non-UTF-8, malformed or empty file raises `PromptFileError`, whose message
is one line naming the file (the CLI prints it and exits with status 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HELDOUT_FILE = Path(__file__).resolve().parent / "prompts" / "heldout.jsonl"
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class PromptFileError(ValueError):
    """A prompt file that cannot be used (the message names the file)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    source: str | None = None


def load_prompt_file(path: str | Path) -> list[Prompt]:
    """The prompts of `path` in file order (see the module docstring for the formats)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path}: not found") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path}: is a directory") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"prompt file {path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"prompt file {path}: cannot read ({e.strerror})") from None
    prompts: list[Prompt] = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"prompt file {path}: line {number} is not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptFileError(f"prompt file {path}: line {number} has no string field \"prompt\"")
            if not record["prompt"].strip():
                raise PromptFileError(f"prompt file {path}: line {number} has an empty prompt")
            source = record.get("source")
            prompts.append(Prompt(str(record.get("id", f"line-{number}")), record["prompt"],
                                  source if isinstance(source, str) else None))
    else:
        prompts = [Prompt(f"line-{number}", line) for number, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {path}: no prompts (file is empty)")
    return prompts


def select_prompts(path: str | Path | None, count: int | None) -> list[Prompt]:
    """The first `count` prompts (all when None) of `path`, or of the shipped held-out set."""
    prompts = load_prompt_file(path if path is not None else HELDOUT_FILE)
    if count is not None:
        if count < 1:
            raise PromptFileError(f"--num-prompts must be >= 1, got {count}")
        prompts = prompts[:count]
    return prompts
