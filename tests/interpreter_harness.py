"""Running Triton-kernel checks under TRITON_INTERPRET=1, which must be set before triton defines kernels.

A test file lists its checks, runs itself as a script in a fresh process with the interpreter on
(`results_in_interpreter(__file__)`), and that script prints `run_checks(...)` as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_checks(checks: dict[str, Callable[[], None]]) -> dict[str, str]:
    """Run every check; name -> "ok" or the error (every failure is reported, not only the first)."""
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    return results


def results_in_interpreter(script: str) -> dict[str, str]:
    """Run `script` in a fresh process with TRITON_INTERPRET=1 and return the JSON it prints last."""
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(checks: dict[str, Callable[[], None]]) -> None:
    """Script entry of a kernel test file: print its check results as one JSON line."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (pytest does this through the interpreter_results fixture)")
    print(json.dumps(run_checks(checks)))
