"""The `varmoe` command line: finds subcommands and dispatches; each lives in its own module.

Subcommands are modules in `var_moe/commands/` (found with pkgutil) plus plug-ins declared under the
`varmoe.commands` entry-point group (the server's `serve`, the analysis jobs' `ab-test`), so this
package never imports `server/` or `analysis_jobs/` directly. A subcommand module defines
`register(subparsers)`, which adds its parser and sets `func=run` (run(args) -> exit code).

Bad flags exit with status 2 and a message naming the flag; errors that are the user's (the
project's own `VarMoeError` types, and a file that is missing or unreadable) print
`varmoe CMD: error: ...` and exit 2. Any other exception is a bug and keeps its traceback.
Run: `varmoe --help`. Test: `pytest tests/test_cli.py`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from importlib.metadata import entry_points

from .errors import VarMoeError

# Only the project's own error types, plus the operating system's word on a path the user gave:
# catching TypeError or RuntimeError here would print a bug as if it were the user's mistake.
USER_ERRORS = (VarMoeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, commands

    parser = argparse.ArgumentParser(
        prog="varmoe", description="Verifiable Adaptive Routing for Mixture-of-Experts models."
    )
    parser.add_argument("--version", action="version", version=f"var-moe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    for ep in sorted(entry_points(group="varmoe.commands"), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an extra (server, loadtest) not installed
            sub.add_parser(ep.name, help=f"(unavailable: {exc.name} is not installed)")
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("varmoe: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        print(f"varmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
