"""Shared pytest fixtures: tiny seeded models and paths. Run the suite with `make test`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def reference_model_dir() -> Path:
    path = ROOT / "models" / "reference-moe"
    if not (path / "config.json").exists():
        pytest.fail(f"the committed reference model is missing at {path}")
    return path
