"""The var-moe inference server.

app.py wires the routers in routes/ (one per concern) around state.py (what routes share);
engine.py + decode.py run the model on one thread in dynamic batches; model_host.py holds the
builtin engine's model, VAR wrapper and capture; var_runtime.py owns the VAR mode and routing
accounting (the seam another engine plugs into); metrics.py exports them to Prometheus;
settings.py + cli.py make `varmoe serve`.

Run: `varmoe serve --help`. Test: `pytest tests/test_server_*.py tests/test_var_runtime.py`.
"""
