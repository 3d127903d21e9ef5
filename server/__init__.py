"""The var-moe inference server, `varmoe serve`: a FastAPI app (app.py, routes/) around one model
engine, the builtin one (engine.py) or vLLM's (vllm_engine.py); the module map is in
docs/ARCHITECTURE.md.

Run: `varmoe serve --help`. Test: `pytest tests/test_server_*.py tests/test_var_runtime.py`.
"""
