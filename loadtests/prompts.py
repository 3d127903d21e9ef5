"""Prompts for the load tests: built-in ones, or a JSONL prompt file read without the library.

`BUILTIN_PROMPTS` lets `locust -f loadtests/locustfile.py --host http://127.0.0.1:8000` run on its
own: short and long pieces of ordinary Python, written for this file (the reference model is
trained on Python's standard library, so they are in-domain; a long one stays well inside its
512-token context with room for the generated tokens). A prompt file (`VARMOE_LT_PROMPTS`,
`python -m loadtests.run --prompts FILE`) overrides them: one JSON object per line with a string
`text` and optionally `kind` (`short` | `long`, defaulting by length). Files cut from a corpus's
test split come from `python -m analysis_jobs.prompt_file`, which needs the library; this module
imports nothing but the standard library (loadtests speaks HTTP only).
Test: `pytest tests/test_loadtests_prompts.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

LONG_MIN_CHARS = 600  # a prompt file's line without `kind` is `long` from this many characters

_SHORT = (
    "import os\n",
    "def main():\n    ",
    "class Config:\n    \"\"\"Settings read from the environment.\"\"\"\n\n    def __init__(self, name):\n",
    "for key, value in sorted(items.items()):\n    if value is None:\n",
    "try:\n    import json\nexcept ImportError:\n    json = None\n\n",
    "def read_lines(path):\n    \"\"\"Return the lines of a text file without their newlines.\"\"\"\n",
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__,",
    "if __name__ == '__main__':\n    import sys\n",
    "def _check_type(value, expected):\n    if not isinstance(value, expected):\n        raise TypeError(",
    "import re\n\n_WORD = re.compile(r'\\w+')\n\n\ndef words(text):\n",
    "    with open(filename, encoding='utf-8') as f:\n        for lineno, line in enumerate(f, 1):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=__doc__)\n",
)

_LONG = (
    '''"""Utilities for reading simple key=value configuration files."""

import os

__all__ = ['load', 'dump']


def load(path, defaults=None):
    """Return a dict of the settings in *path*.

    Blank lines and lines starting with '#' are ignored. Values keep their
    surrounding whitespace stripped; a key given twice keeps the last value.
    """
    result = dict(defaults or {})
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            if '=' not in line:
                raise ValueError('%s:%d: expected key=value' % (path, lineno))
            key, value = line.split('=', 1)
            result[key.strip()] = value.strip()
    return result


def dump(settings, path):
''',
    '''class LRUCache:
    """A mapping that keeps at most *maxsize* items, dropping the least recently used."""

    def __init__(self, maxsize=128):
        if maxsize < 1:
            raise ValueError('maxsize must be at least 1')
        self.maxsize = maxsize
        self._data = {}

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        return key in self._data

    def get(self, key, default=None):
        try:
            value = self._data.pop(key)
        except KeyError:
            return default
        self._data[key] = value
        return value

    def put(self, key, value):
''',
    '''def walk_tree(top, onerror=None, followlinks=False):
    """Yield (dirpath, dirnames, filenames) for each directory under *top*.

    Directories are visited top-down; the caller may prune *dirnames* in place
    to skip sub-trees, as with os.walk.
    """
    stack = [top]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except OSError as error:
            if onerror is not None:
                onerror(error)
            continue
        dirs, files = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=followlinks)
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
''',
    '''import unittest


class TestSplitWords(unittest.TestCase):

    def test_empty(self):
        self.assertEqual(split_words(''), [])

    def test_spaces(self):
        self.assertEqual(split_words('  a  b '), ['a', 'b'])

    def test_punctuation(self):
        self.assertEqual(split_words('a, b; c.'), ['a', 'b', 'c'])

    def test_unicode(self):
        self.assertEqual(split_words('caf\\u00e9 cr\\u00e8me'), ['caf\\u00e9', 'cr\\u00e8me'])

    def test_type_error(self):
        with self.assertRaises(TypeError):
            split_words(None)

    def test_keeps_order(self):
''',
)

BUILTIN_PROMPTS: tuple[dict, ...] = tuple(
    [{"id": f"builtin-short-{i}", "kind": "short", "text": t} for i, t in enumerate(_SHORT)]
    + [{"id": f"builtin-long-{i}", "kind": "long", "text": t} for i, t in enumerate(_LONG)]
)


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts of a JSONL file; each line needs a string `text` (`kind` defaults by length)."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
                raise ValueError(f"{path}:{i + 1}: each line needs a non-empty string field 'text'")
            row.setdefault("kind", "long" if len(row["text"]) >= LONG_MIN_CHARS else "short")
            if row["kind"] not in ("short", "long"):
                raise ValueError(f"{path}:{i + 1}: 'kind' must be short or long, got {row['kind']!r}")
            out.append(row)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompts_from_env(path: str | None) -> list[dict]:
    """The prompt file at `path` when given (the override), else the built-in prompts."""
    return read_prompts(path) if path else [dict(p) for p in BUILTIN_PROMPTS]
