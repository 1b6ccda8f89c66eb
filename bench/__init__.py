"""resdiff's benchmarks, each run from the repository root as `python -m bench.NAME` (docs/benchmarks.md)."""
