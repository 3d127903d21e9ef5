"""The var-moe inference server.

app.py wires the routers in routes/ (one per concern) around state.py (what routes share);
host.py is the engine contract (what routes and engines ask of a loaded model), jobs.py the jobs
both engines run; engine.py + decode.py run the model on one thread in dynamic batches;
model_host.py holds the builtin engine's model, VAR wrapper and capture; vllm_engine.py +
vllm_host.py run vLLM instead; var_runtime.py owns the VAR mode and routing accounting;
metrics.py exports them to Prometheus;
settings.py + cli.py make `varmoe serve`.

Run: `varmoe serve --help`. Test: `pytest tests/test_server_*.py tests/test_var_runtime.py`.
"""
