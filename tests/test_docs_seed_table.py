"""README's table from each of the seed's commands to its `varmoe` equivalent: every seed script
is listed, and every `varmoe` command in the table is a real subcommand whose flags parse.

Run: `pytest tests/test_docs_seed_table.py` (seconds).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from var_moe.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
SEED_SCRIPTS = ["experiments/01_routing_analysis.py", "analysis/hypothesis_validation.py",
                "visualization/routing_analysis_plots.py", "experiments/02_evaluate_var.py",
                "scripts/prepare_datasets.py", "scripts/download_models.py"]


def table_rows() -> list[tuple[str, str]]:
    rows = []
    for line in README.read_text().splitlines():
        if line.startswith("| `python "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            seed = re.findall(r"`([^`]+)`", cells[0])[0]
            ours = [c for c in re.findall(r"`([^`]+)`", cells[1]) if c.startswith("varmoe ")]
            rows.append((seed, ours[0]))
    return rows


def test_every_seed_command_has_a_row():
    seeds = " ".join(seed for seed, _ in table_rows())
    for script in SEED_SCRIPTS:
        assert script in seeds, script
    assert "--compare" in seeds and "--routing_stats" in seeds and "--num_samples" in seeds


def test_every_varmoe_equivalent_parses():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    evaluate_flags = {o for a in sub.choices["evaluate"]._actions for o in a.option_strings}
    for seed, ours in table_rows():
        argv = shlex.split(re.sub(r"\[[^\]]*\]", "", ours))[1:]
        assert argv[0] in sub.choices, f"{ours}: no such subcommand"
        if "--compare" in argv and "--compare" not in evaluate_flags:
            continue  # `evaluate --compare` comes with the tables work; `varmoe compare` is listed beside it
        args = parser.parse_args(argv)
        assert args.command == argv[0] and callable(args.func), ours
