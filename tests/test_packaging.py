"""The installed distribution is safe beside other packages: the design card's top-level folders
(`model/`, `kernels/`, `mtp/`, `bench/`) install as subpackages of `specdec`, so nothing but
`specdec` lands in site-packages, and Hugging Face's own `kernels` package (which transformers
probes for) imports beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_one_top_level_package(tmp_path):
    source = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                ".train", "results", ".pytest_cache", ".benchmarks"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("specdec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"specdec", wheel.name.split("-py")[0] + ".dist-info"}
    for wanted in ("specdec/engine.py", "specdec/model/transformer.py", "specdec/kernels/triton_fp8.py",
                   "specdec/mtp/drafter.py", "specdec/bench/__main__.py", "specdec/bench/prompts/heldout.jsonl",
                   "specdec/default_model/config.json"):
        assert wanted in names, wanted


def test_hugging_face_kernels_and_transformers_import_beside_specdec(tmp_path):
    """Run outside the checkout (its root not on the path): `import kernels` is Hugging Face's, which
    transformers finds as the distribution `kernels`, and specdec's own kernels still serve a decode."""
    code = "\n".join([
        "import importlib.util, kernels, transformers",
        "from transformers.utils.import_utils import _is_package_available",
        "import specdec.kernels",
        "from specdec import Engine",
        "assert hasattr(kernels, 'get_kernel') and _is_package_available('kernels'), kernels.__file__",
        "assert specdec.kernels.__name__ == 'specdec.kernels' and kernels is not specdec.kernels",
        "found = [importlib.util.find_spec(name) for name in ('model', 'mtp', 'bench')]",
        "out = Engine.from_pretrained(path=None).generate(['def f(x):'], max_new_tokens=4)",
        "print(kernels.__file__, len(out.token_ids[0]), *[s.origin for s in found if s is not None])",
    ])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf_file, n, *others = proc.stdout.split()
    ours = [REPO / name for name in ("model", "kernels", "mtp", "bench")]
    assert n == "4"
    assert not [f for f in (hf_file, *others) if any(Path(f).resolve().is_relative_to(d) for d in ours)]
