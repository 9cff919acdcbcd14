"""specdec: lossless speculative decoding for DeepSeek-V3 (runtime: engine, loop, cache, CLI).

The design card keeps the model, kernels, drafter and benchmarks in top-level folders of the
repository (`model/`, `kernels/`, `mtp/`, `bench/`), but they are packages of specdec: imported
as `specdec.model`, `specdec.kernels`, `specdec.mtp`, `specdec.bench`, and installed under
`specdec/` (pyproject.toml maps the folders), so that nothing named `model` or `kernels` lands
in site-packages beside other packages (Hugging Face's `kernels`, which transformers probes for).
In a checkout the folders sit beside this package: its search path takes in the repository root
for them.
"""

from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "model" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821  (a package's own search path)

from specdec.engine import Engine, GenerationOutput, GenerationStats, SpecConfig  # noqa: E402

__all__ = ["Engine", "GenerationOutput", "GenerationStats", "SpecConfig"]
