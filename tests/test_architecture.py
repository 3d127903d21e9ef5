"""The layout's rules, read from the source with `ast` (no third-party tool):

- no import cycles among the project's modules (function-level imports count too);
- `var_moe` (the library) imports nothing from server/, analysis_jobs/, loadtests/, benchmarks/
  or a web library;
- `loadtests` speaks HTTP only: none of var_moe, server, analysis_jobs, torch, transformers;
- `server` runs no analysis-job, load-test or benchmark code.

Run: `pytest tests/test_architecture.py` (a second, no model).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("var_moe", "server", "analysis_jobs", "loadtests", "benchmarks")
WEB = {"httpx", "fastapi", "starlette", "uvicorn", "locust", "requests", "aiohttp"}
FORBIDDEN = {
    "var_moe": {"server", "analysis_jobs", "loadtests", "benchmarks"} | WEB,
    "loadtests": {"var_moe", "server", "analysis_jobs", "benchmarks", "torch", "transformers"},
    "server": {"analysis_jobs", "loadtests", "benchmarks"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for part in PARTS for p in sorted((ROOT / part).rglob("*.py"))}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `name` imports (absolute names; a `from pkg import sub` names the submodule)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for a in node.names:  # `from . import stats` imports the submodule stats
                if f"{target}.{a.name}" in known:
                    out.add(f"{target}.{a.name}")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_part_is_found(graph):
    assert {m.split(".")[0] for m in graph} == set(PARTS)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_forbidden_imports(graph, part):
    bad = [f"{m} imports {i}" for m, imps in sorted(graph.items()) if m.split(".")[0] == part
           for i in sorted(imps) if i.split(".")[0] in FORBIDDEN[part]]
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (iterative DFS), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(edges, WHITE)
    for start in sorted(edges):
        if color[start] != WHITE:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        color[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = BLACK
                stack.pop()
                path.pop()
            elif color[child] == GREY:
                return path[path.index(child):] + [child]
            elif color[child] == WHITE:
                color[child] = GREY
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return None


def test_no_import_cycles(graph):
    edges = {m: {i for i in imps if i in graph and i != m} for m, imps in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
