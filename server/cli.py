"""`varmoe serve`: parse flags into `ServerSettings` and run the app under uvicorn.

Every flag has a `VARMOE_*` environment twin (flag wins); `--help` lists them all, derived from
`ServerSettings` (the admin token, environment only, first). With no arguments it serves the
reference model on 127.0.0.1:8000 with its VAR tables when they are present. Examples:
    varmoe serve
    VARMOE_ADMIN_TOKEN=secret varmoe serve --port 9000 --max-batch-size 16 --no-var-on-start
Test: `pytest tests/test_server_api.py` (starts `varmoe serve` in a subprocess).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from var_moe.errors import InvalidInputError

# flag name -> (type, help); None type = boolean switch with a --no- twin
FLAGS: dict[str, tuple[type | None, str]] = {
    "model": (str, "local folder or hub id (default: the reference model)"),
    "dtype": (str, "auto | float32 | bfloat16 | float16"),
    "device": (str, "cpu | cuda | auto"),
    "quantization": (str, "4bit | 8bit (bitsandbytes, CUDA only)"),
    "trust_remote_code": (None, "run the model repo's own Python"),
    "served_model_name": (str, "the model's name in /v1/models, /readyz and completions (default: folder name)"),
    "threads": (int, "torch CPU threads of the engine"),
    "engine": (str, "builtin (default; capture and audit) | vllm (needs the vLLM environment)"),
    "tensor_parallel_size": (int, "vLLM: GPUs per replica (tensor parallel)"),
    "data_parallel_size": (int, "vLLM: 1 only; data parallel = servers behind a load balancer"),
    "gpu_memory_utilization": (float, "vLLM: share of GPU memory for weights and KV cache"),
    "max_model_len": (int, "vLLM: context length"),
    "vllm_quantization": (str, "vLLM: quantization method (awq, gptq, fp8, ...)"),
    "enforce_eager": (None, "vLLM: run eagerly (no torch.compile, no CUDA graphs)"),
    "vllm_pair_capacity": (int, "vLLM: (previous, token) table entries the engine can hold (default: those of the startup tables file)"),
    "vllm_log_stats": (None, "vLLM: collect and log vLLM's own engine statistics (default off)"),
    "var_tables": (str, "VAR tables (.safetensors); default <model>/var/var_tables.safetensors"),
    "routing_stats": (str, "Phase 1 statistics; default <model>/var/routing_stats_calibration.parquet"),
    "var_config": (str, "VARConfig JSON file or preset name"),
    "var_on_start": (None, "start in VAR mode when VAR is available (default on)"),
    "allow_var_pin_when_off": (None, "accept per-request var: true while VAR is off (default: 409)"),
    "shadow_rate": (float, "share of table/cache decisions re-checked by the learned router (verification)"),
    "expert_load_metrics": (None, "expert-load gauges per MoE layer in /metrics (default on)"),
    "expert_load_per_expert": (None, "also per-(layer, expert) token counters: MoE layers x experts series"),
    "expert_load_window_s": (float, "sliding window (s) of the expert-load gauges"),
    "max_response_bytes": (int, "largest response a request may ask for (routed experts over it: 413)"),
    "host": (str, "bind address (default 127.0.0.1)"),
    "port": (int, "port (default 8000; 0 = any free port)"),
    "max_batch_size": (int, "rows per model batch"),
    "max_wait_ms": (float, "longest wait (ms) for the clients of the batch that just ended"),
    "max_queue": (int, "waiting requests before 429"),
    "request_timeout_s": (float, "per-request time limit"),
    "max_prompt_tokens": (int, "longest accepted prompt"),
    "max_new_tokens_limit": (int, "largest accepted max_new_tokens / max_tokens"),
    "max_request_prompts": (int, "prompts / texts per request"),
    "max_request_tokens": (int, "work budget per request: prompt + new tokens over all its prompts"),
    "shutdown_grace_s": (float, "total time shutdown waits for in-flight work (requests, then the engine)"),
    "max_body_bytes": (int, "largest request body; larger ones get 413 before parsing"),
    "body_timeout_s": (float, "time a request body may take to arrive (408 after it)"),
    "max_connections": (int, "concurrent connections before 503 (uvicorn limit_concurrency)"),
    "keep_alive_s": (float, "idle keep-alive timeout"),
}


SERVICE = (
    "Serve a causal MoE model over HTTP (FastAPI + uvicorn) with the VAR router switchable at run time: "
    "POST /v1/generate, /v1/perplexity, /v1/completions (OpenAI-compatible), GET /v1/models, /var/status, "
    "/healthz, /readyz, /metrics (Prometheus); admin: POST /var/toggle, /admin/capture/*. With no arguments "
    "it serves the reference model on 127.0.0.1:8000 with its VAR tables. Request bodies must be JSON "
    "(Content-Type: application/json)."
)


def env_epilog() -> str:
    """Every `VARMOE_*` variable, derived from ServerSettings' fields (so the list cannot drift), token first."""
    from .settings import ServerSettings

    fields = ServerSettings.model_fields
    names = ["admin_token"] + [n for n in fields if n != "admin_token"]
    width = max(len(n) for n in names) + len("VARMOE_") + 4
    lines = ["environment (each flag above has a VARMOE_* twin; the flag wins):"]
    for name in names:
        info = fields[name]
        if name == "admin_token":
            text = ("Bearer token of the admin endpoints (no flag: keep it out of the process list). "
                    "Unset: POST /var/toggle and /admin/capture/* refuse with 403.")
        else:
            text = FLAGS[name][1] if name in FLAGS else (info.description or "")
            if "default" not in text and info.default is not None and not isinstance(info.default, bool):
                text += f" (default {info.default})"
        wrapped = textwrap.wrap(text, 100 - width) or [""]
        lines.append(f"  {('VARMOE_' + name.upper()).ljust(width - 2)}{wrapped[0]}")
        lines.extend(" " * width + more for more in wrapped[1:])
    lines += ["", "example: VARMOE_ADMIN_TOKEN=secret varmoe serve --port 9000 --max-batch-size 16"]
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP inference server (FastAPI + uvicorn)",
                              description=textwrap.fill(SERVICE, 100), epilog=env_epilog(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, (typ, help_) in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if typ is None:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, type=typ, default=None, help=help_)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from .settings import ServerSettings

    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k, None) is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise InvalidInputError(f"--{field.replace('_', '-')} (or VARMOE_{field.upper()}): {first['msg']}") from None


def graceful_server(config, state):
    """uvicorn's Server that starts the app's shutdown clock when shutdown begins, so waiting for
    open requests and draining the engine share one `shutdown_grace_s` (compose's stop_grace_period
    must stay above it)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.begin_shutdown()
            await super().shutdown(sockets)

    return GracefulServer(config)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = build_settings(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    print(f"varmoe serve: http://{settings.host}:{settings.port} model={settings.model}", file=sys.stderr, flush=True)
    # A float grace (never `int(grace) or None`: 0.5 s used to become "no limit").
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s)
    graceful_server(config, app.state.varmoe).run()
    return 0
