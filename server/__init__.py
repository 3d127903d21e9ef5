"""The var-moe inference server: FastAPI app (app.py), engine thread (engine.py, decode.py),
VAR / capture integration (var_runtime.py), metrics, settings and the `varmoe serve` command (cli.py).

Run: `varmoe serve --help`. Test: `pytest tests/test_server_*.py`.
"""
