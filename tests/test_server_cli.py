"""`varmoe serve` flags and VARMOE_* environment variables -> ServerSettings (no server started).

Run: `pytest tests/test_server_cli.py` (seconds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from server.cli import build_settings, register
from server.settings import ServerSettings
from var_moe.loading import REFERENCE_MODEL_DIR


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    return p.parse_args(["serve", *argv])


def test_defaults_serve_the_reference_model_on_loopback(monkeypatch):
    for k in ("VARMOE_PORT", "VARMOE_HOST", "VARMOE_ADMIN_TOKEN", "VARMOE_MODEL"):
        monkeypatch.delenv(k, raising=False)
    s = build_settings(parse([]))
    assert s.host == "127.0.0.1" and s.port == 8000 and s.model == str(REFERENCE_MODEL_DIR)
    assert s.admin_token_value() is None


def test_flag_beats_environment(monkeypatch):
    monkeypatch.setenv("VARMOE_PORT", "9100")
    monkeypatch.setenv("VARMOE_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("VARMOE_ADMIN_TOKEN", "abc")
    s = build_settings(parse(["--port", "9200"]))
    assert s.port == 9200 and s.max_batch_size == 4 and s.admin_token_value() == "abc"
    assert "abc" not in repr(s)  # the token never shows up in logs or reprs
    s = build_settings(parse(["--no-var-on-start"]))
    assert s.var_on_start is False


@pytest.mark.parametrize("argv,env,needle", [
    (["--port", "70000"], {}, "--port"),
    (["--max-batch-size", "0"], {}, "--max-batch-size"),
    ([], {"VARMOE_MAX_QUEUE": "0"}, "VARMOE_MAX_QUEUE"),
    (["--var-tables", "/nonexistent/t.safetensors"], {}, "--var-tables"),
    (["--dtype", "int3"], {}, "--dtype"),
    (["--max-body-bytes", "10"], {}, "--max-body-bytes"),
])
def test_bad_settings_name_the_flag(monkeypatch, argv, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=needle):
        build_settings(parse(argv))


def test_cli_exit_code_and_message():
    res = subprocess.run([sys.executable, "-m", "var_moe.cli", "serve", "--max-wait-ms", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--max-wait-ms" in res.stderr and "Traceback" not in res.stderr


def test_settings_refuse_unknown_environment_free_fields():
    with pytest.raises(ValueError):
        ServerSettings(max_batch=3)


def test_help_describes_the_service_and_lists_every_variable_token_first():
    res = subprocess.run([sys.executable, "-m", "var_moe.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "/v1/generate" in text and "/metrics" in text and "reference model" in text
    env_part = text[text.index("environment"):]
    listed = [line.split()[0] for line in env_part.splitlines() if line.strip().startswith("VARMOE_")]
    expected = {"VARMOE_" + name.upper() for name in ServerSettings.model_fields}
    assert set(listed) == expected and len(listed) == len(expected)  # every setting, once
    assert listed[0] == "VARMOE_ADMIN_TOKEN"
    assert "/var/toggle" in env_part.split("VARMOE_MODEL")[0] and "403" in env_part.split("VARMOE_MODEL")[0]
