"""Benchmarks of the whole service: `python -m bench --help`, bench/README.md."""
