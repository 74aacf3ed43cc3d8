"""Benchmarks: ``python -m bench.run`` measures and rewrites BENCHMARKS.md."""
