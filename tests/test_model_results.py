"""The side-by-side tables of both reference models in README.md and the guides hold the numbers of
the committed result files: each doc contains its table exactly as `analysis_jobs.model_results`
renders it from those files, and a few cells are checked against the JSON directly.

Run: `pytest tests/test_model_results.py` (seconds). After new results, regenerate the tables with
`python -m analysis_jobs.model_results` and paste them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis_jobs import model_results as mr

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"headline": "README.md", "phase1": "docs/PHASE1.md", "phase2": "docs/PHASE2.md", "offload": "docs/OFFLOAD.md"}


@pytest.mark.parametrize("table, doc", sorted(DOCS.items()))
def test_doc_holds_the_table_from_the_result_files(table, doc):
    rendered = mr.TABLES[table]()
    assert rendered in (ROOT / doc).read_text(), (
        f"{doc}: its {table} table differs from the result files; paste `python -m analysis_jobs.model_results --table {table}`")


def test_cells_match_the_json():
    for name, paths in mr.MODELS.items():
        h = json.loads((ROOT / paths["heldout"]).read_text())
        row = next(r for r in h["rows"] if r["model"] == "trained" and r["predictor"] == "token_table" and r["layer"] == "all")
        assert mr.phase1_facts(name)["token table: exact top-k set"].startswith(f"{100 * row['exact']:.1f}%")
        v = json.loads((ROOT / paths["var"]).read_text())
        assert mr.phase2_facts(name)["decisions served by the tables (evaluate sample)"] == \
            f"{100 * v['var_stats']['overall']['routing_distribution']['fast']:.1f}%"
    # every configured result file of the second model exists: no column silently left out
    second = mr.MODELS["reference-moe-2"]
    for path in [second["heldout"], second["tables"], second["var"], *second["sims"].values()]:
        assert (ROOT / path).exists(), path


def test_render_marks_missing_cells():
    out = mr._render({"a": {"x": "1"}, "b": {"y": "2"}})
    assert "| x | 1 | not measured |" in out and "| y | not measured | 2 |" in out
