"""Benchmarks of the whole service: `python -m bench.run --help`, bench/README.md."""
