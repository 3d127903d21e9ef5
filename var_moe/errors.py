"""The project's own error types: the errors that are the user's (a flag, a value, a file), which
the CLI prints as `varmoe CMD: error: ...` with exit status 2 instead of a stack trace.

Anything else (TypeError, RuntimeError, IndexError, ...) is a bug and keeps its traceback, so the
CLI never hides one behind a one-line message. `InvalidInputError` is also a `ValueError`, so code
and tests that catch `ValueError` keep working. Test: `pytest tests/test_cli.py`.
"""

from __future__ import annotations


class VarMoeError(Exception):
    """Base of every error that describes the user's input rather than a bug."""


class InvalidInputError(VarMoeError, ValueError):
    """A value, flag, configuration or file content that the library refuses, with the reason."""


class UnknownLayerError(VarMoeError, KeyError):
    """A layer index that the object at hand does not track."""
