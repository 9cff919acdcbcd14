"""Loading a checkpoint's tokenizer from its local files only (no hub access, no remote code)."""

from __future__ import annotations

import logging
from pathlib import Path

from specdec.model.errors import CheckpointError


def load_tokenizer(path: str | Path):
    """`transformers` fast tokenizer from `path/tokenizer.json` (+ `tokenizer_config.json`)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: tokenizer.json is missing")
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise CheckpointError(f"{path}: cannot load tokenizer ({type(e).__name__}: {e})") from None
