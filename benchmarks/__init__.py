"""Benchmarks: speed and memory measurements, each a module with `main(argv)` that prints a table
and, with `--output PATH`, writes its JSON (committed results live in benchmarks/results/, each
with the exact command beside its numbers in docs/BENCHMARKS.md). Run one with
`python -m benchmarks NAME [flags]` or `make bench NAME=... ARGS="..."`; `python -m benchmarks`
lists them. Test: `pytest tests/test_benchmarks_runner.py`.
"""
