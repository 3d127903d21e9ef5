"""Every test file a docstring names exists: a `tests/....py` path or a bare `test_*.py` name in
any docstring (module, class, function) of the project's Python files must be a file under tests/.
Run: `pytest tests/test_docs_test_names.py` (a second).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("var_moe", "server", "analysis_jobs", "loadtests", "benchmarks", "tests")
TEST_PATH = re.compile(r"(?<![\w/.])tests/[\w/]+\.py")
TEST_NAME = re.compile(r"(?<![\w/.])test_\w+\.py")


def docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return [d for n in nodes if (d := ast.get_docstring(n))]


def named_test_files(text: str) -> set[str]:
    paths = set(TEST_PATH.findall(text))
    bare = {f"tests/{n}" for n in TEST_NAME.findall(TEST_PATH.sub("", text))}
    return paths | bare


def test_named_test_files_exist():
    missing = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for doc in docstrings(path):
                for name in sorted(named_test_files(doc)):
                    found = (REPO / name).exists() or (REPO / "tests" / "vllm_engine" / Path(name).name).exists()
                    if not found:
                        missing.append(f"{path.relative_to(REPO)} names {name}")
    assert not missing, "docstrings name test files that do not exist:\n" + "\n".join(missing)


def test_the_scan_finds_names():
    """The patterns see both spellings (a scan that finds nothing would pass for the wrong reason)."""
    text = "Test: `pytest tests/test_a.py test_b.py` and loadtests/locustfile.py"
    assert named_test_files(text) == {"tests/test_a.py", "tests/test_b.py"}
    found = {n for path in (REPO / "var_moe").rglob("*.py") for d in docstrings(path) for n in named_test_files(d)}
    assert len(found) >= 20  # most modules name their test
