"""docs/ARCHITECTURE.md covers every module: each Python file of the project's packages is named
there (by file name, or by its module name as a word). Run: `pytest tests/test_docs_architecture.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("var_moe", "server", "analysis_jobs", "loadtests", "benchmarks")


def named(doc: str, path: Path) -> bool:
    return path.name in doc or re.search(rf"(?<![\w.]){re.escape(path.stem)}(?!\w)", doc) is not None


def test_every_module_is_in_the_architecture_doc():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(REPO)) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and not named(doc, p)]
    assert not missing, "modules docs/ARCHITECTURE.md does not name:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_module():
    assert not named("loading.py and corpus", Path("var_moe/certify.py"))
    assert named("var/certify.py statistics", Path("var_moe/var/certify.py"))
