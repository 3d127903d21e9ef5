"""The `varmoe` CLI: help lists subcommands, info describes models, bad flags exit 2 with the flag named."""

import json
import subprocess
import sys

from var_moe.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "var_moe.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_core_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("info", "train-reference"):
        assert cmd in out.stdout


def test_info_reference_model(reference_model_dir, capsys):
    assert main(["info", str(reference_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "mixtral" and info["num_experts"] == 8 and info["top_k"] == 2
    assert info["num_layers"] == 4 and info["parameters_total"] > info["parameters_routed_experts"] > 0
    assert info["test_perplexity"] > 1


def test_info_unknown_path_is_clear_error(tmp_path):
    out = run_cli("info", str(tmp_path / "missing-model"))
    assert out.returncode == 2
    assert "missing-model" in out.stderr and "Traceback" not in out.stderr


def test_bad_flag_value_names_flag():
    out = run_cli("train-reference", "--max-steps", "0", "--work-dir", "/nonexistent/x")
    assert out.returncode == 2 and "--max-steps" in out.stderr
