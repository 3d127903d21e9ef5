"""`varmoe serve`: parse flags into `ServerSettings` and run the app under uvicorn.

One flag per `ServerSettings` field, generated from it (server/settings.py: precedence, defaults);
`--help` also lists every `VARMOE_*` variable, the environment-only admin token first. Examples:
    varmoe serve
    VARMOE_ADMIN_TOKEN=secret varmoe serve --port 9000 --max-batch-size 16 --no-var-on-start
Test: `pytest tests/test_server_cli.py tests/test_server_api.py` (the latter starts `varmoe serve` in a subprocess).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import types
import typing

from var_moe.errors import InvalidInputError

ENV_ONLY = ("admin_token",)  # secrets stay out of the process list: environment only

SERVICE = (
    "Serve a causal MoE model over HTTP (FastAPI + uvicorn) with the VAR router switchable at run time: "
    "POST /v1/generate, /v1/perplexity, /v1/completions (OpenAI-compatible), GET /v1/models, /var/status, "
    "/healthz, /readyz, /metrics (Prometheus); admin: POST /var/toggle, /admin/capture/*. With no arguments "
    "it serves the reference model on 127.0.0.1:8000 with its VAR tables. Request bodies must be JSON "
    "(Content-Type: application/json)."
)


def env_epilog(fields: dict) -> str:
    """Every `VARMOE_*` variable, from ServerSettings' fields (so the list cannot drift), env-only ones first."""
    names = [*ENV_ONLY, *(n for n in fields if n not in ENV_ONLY)]
    width = max(len(n) for n in names) + len("VARMOE_") + 4
    lines = ["environment (each flag above has a VARMOE_* twin; the flag wins):"]
    for name in names:
        info = fields[name]
        text = info.description or ""
        if "default" not in text and info.default is not None and not isinstance(info.default, bool):
            text += f" (default {info.default})"
        wrapped = textwrap.wrap(text, 100 - width) or [""]
        lines.append(f"  {('VARMOE_' + name.upper()).ljust(width - 2)}{wrapped[0]}")
        lines.extend(" " * width + more for more in wrapped[1:])
    lines += ["", "example: VARMOE_ADMIN_TOKEN=secret varmoe serve --port 9000 --max-batch-size 16"]
    return "\n".join(lines)


def register(subparsers) -> None:
    """`serve` with one flag per ServerSettings field, its description the help. Values reach
    ServerSettings as given (a bool is a switch with a --no- twin), so its messages name the flag."""
    from .settings import ServerSettings

    fields = ServerSettings.model_fields
    p = subparsers.add_parser("serve", help="run the HTTP inference server (FastAPI + uvicorn)",
                              description=textwrap.fill(SERVICE, 100), epilog=env_epilog(fields),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, info in fields.items():
        if name in ENV_ONLY:
            continue
        ann = info.annotation
        if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None -> X
            ann = next(a for a in typing.get_args(ann) if a is not type(None))
        if ann is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        else:  # str, Path, Literal[...]: strings, checked by the settings
            kind = {"type": ann if ann in (int, float) else str}
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=info.description or "", **kind)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def build_settings(args: argparse.Namespace):
    from pydantic import ValidationError

    from .settings import ServerSettings

    given = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "settings"
        raise InvalidInputError(f"--{field.replace('_', '-')} (or VARMOE_{field.upper()}): {first['msg']}") from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = build_settings(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    print(f"varmoe serve: http://{settings.host}:{settings.port} model={settings.model}", file=sys.stderr, flush=True)
    # the grace stays a float: int() would turn 0.5 s into 0
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace_s,
                            limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive_s)

    class GracefulServer(uvicorn.Server):
        """Starts the app's shutdown clock when shutdown begins, so waiting for open requests and
        draining the engine share one `shutdown_grace_s` (compose's stop_grace_period must stay above it)."""

        async def shutdown(self, sockets=None):
            app.state.varmoe.begin_shutdown()
            await super().shutdown(sockets)

    GracefulServer(config).run()
    return 0
