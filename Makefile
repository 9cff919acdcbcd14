# specdec: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on disk; a looser pin would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) -m specdec.generate --prompt "def fibonacci(n):" --prompt "class Stack:" --max-new-tokens 64 --compare

# The suite runs in TEST_WORKERS pytest-xdist processes, a test file to a worker (its module
# fixtures, e.g. compiled graphs, built once), the cores shared among them (tests/conftest.py).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The benchmark suite (not part of `make test`): pytest-benchmark micro-benchmarks, then
# acceptance, latency and peers; JSON, Markdown and plots land in bench/results/.
BENCH_ARGS ?=
$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.installed-bench
	mkdir -p bench/results
	$(PY) -m pytest bench/perf --benchmark-only -q -p no:cacheprovider \
		--benchmark-json bench/results/perf.json
	$(PY) -m specdec.bench all --out bench/results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
