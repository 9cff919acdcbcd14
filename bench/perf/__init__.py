"""pytest-benchmark micro-benchmarks (not part of `make test`): `pytest bench/perf --benchmark-only`."""
