"""README's command examples run in order and write under runs/ (git-ignored), never into the repository root.

For every `varmoe ...` line in README.md's bash blocks (continuations joined): each output flag
(`-o`, `--output`, `--output-dir`, `--json`) names a path under `runs/`, and each input
(`--input`, `--heldout`, `--tables`, `--routing-stats`, the files of `compare` / `merge-stats`)
is either written by an earlier line of the README or a file of the repository.
Run: `pytest tests/test_docs_commands.py` (a second).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUTPUT_FLAGS = {"-o", "--output", "--output-dir", "--json"}
INPUT_FLAGS = {"--input", "--heldout", "--tables", "--routing-stats", "--routing_stats"}
POSITIONAL_INPUTS = {"compare", "merge-stats"}


def readme_commands() -> list[list[str]]:
    out, in_block, pending = [], False, ""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_block, pending = line.strip() == "```bash", ""
            continue
        if not in_block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line.replace("[", "# ["), comments=True)  # `[--optional flags]` are remarks
        while words and "=" in words[0]:  # VAR=value prefixes
            words = words[1:]
        if words[:1] == ["varmoe"] or words[:1] == ["torchrun"]:
            out.append(words)
    return out


def test_readme_commands_write_under_runs_and_read_what_exists_or_came_before():
    cmds = readme_commands()
    assert len(cmds) >= 10
    written: set[str] = set()
    for words in cmds:
        outputs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]
        inputs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in INPUT_FLAGS]
        if len(words) > 1 and words[1] in POSITIONAL_INPUTS:
            inputs += [w for w in words[2:] if not w.startswith("-") and w not in outputs and w.endswith((".json", ".parquet"))]
        for path in outputs:
            assert path.startswith("runs/"), f"{' '.join(words)}: writes {path} outside runs/"
        for path in inputs:
            assert path in written or (REPO / path).exists(), f"{' '.join(words)}: reads {path} before any line writes it"
        written.update(outputs)


def test_runs_is_ignored_by_git():
    res = subprocess.run(["git", "check-ignore", "-q", "runs/phase1/stats_test.parquet"], cwd=REPO, timeout=30)
    assert res.returncode == 0
