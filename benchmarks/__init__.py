"""Benchmarks: run with `python -m benchmarks.<name>` or pytest with --benchmark-enable."""
