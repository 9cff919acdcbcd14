"""Where measurements of this machine are kept, and what they are keyed by.

Speed choices (`kernels.cpu_gemm`, `specdec.adaptive`) are measured on the machine that runs
them and cached as JSON in `$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else
`~/.cache/specdec`, under a key naming what the measurement depends on.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import torch


def cache_dir() -> Path:
    """`$SPECDEC_CACHE`, else `$XDG_CACHE_HOME/specdec`, else `~/.cache/specdec`."""
    if os.environ.get("SPECDEC_CACHE"):
        return Path(os.environ["SPECDEC_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "specdec"


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_key(dtype: torch.dtype) -> str:
    """What a CPU timing depends on: CPU model, torch version, intra-op threads, dtype."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {dtype}"


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: Path, data: dict) -> bool:
    """Write `data` to `path` atomically (temp file, then rename); False when the cache is not
    writable, which is not an error: the measurement is taken again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        return False
    return True
