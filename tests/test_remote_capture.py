"""`varmoe capture-server`: statistics captured through a running server equal an offline capture.

The server forwards the same token sequences (the offline job's, sent as token ids) through the
learned routers; padding and batch composition differ between the two, so float columns agree to a
tolerance and the count columns exactly (a top-k choice could only flip on an exact tie).
"""

from __future__ import annotations

import pytest
import torch
from stats_compare import compare_stats

from analysis_jobs.fixtures import tiny_var_model
from analysis_jobs.remote_capture import RemoteCaptureError, capture_via_server
from analysis_jobs.server_process import ManagedServer
from var_moe.capture.job import CaptureConfig, run_capture
from var_moe.capture.schema import read_stats
from var_moe.loading import load_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rc")
    model_dir = tiny_var_model(tmp / "m")
    # the server names its model by folder name unless told; here the name is the folder itself, so that
    # capture-server without --model can load the tokenizer the server names
    server = ManagedServer(model_dir, args=["--served-model-name", str(model_dir)], log_path=tmp / "server.log").wait_ready()
    yield tmp, model_dir, server
    server.stop()


def test_server_capture_equals_offline_capture(setup):
    tmp, model_dir, server = setup
    torch.set_num_threads(1)
    model, tok = load_model(str(model_dir))
    kw = dict(dataset="stdlib", split="calibration", num_samples=12, max_length=64)
    remote = capture_via_server(server.url, server.admin_token, tok, tmp / "remote.parquet", batch_size=5, **kw)
    offline = tmp / "offline.parquet"
    run_capture(CaptureConfig(model=str(model_dir), batch_size=4, **kw), offline, model=model, tokenizer=tok, progress=False)
    a, ma = read_stats(remote)
    b, mb = read_stats(offline)
    assert ma["num_tokens"] == mb["num_tokens"] > 0
    assert ma["dataset"] == "stdlib" and ma["split"] == "calibration"
    exact = ["frequency", "expert_ids", "top1_counts", "topk_counts", "top_expert", "modal_topk_set", "modal_set_count"]
    assert compare_stats(a[["layer", "token_id"] + exact], b[["layer", "token_id"] + exact]) == []
    assert compare_stats(a, b, rtol=1e-4, atol=1e-5) == []


def test_admin_token_is_required(setup):
    tmp, model_dir, server = setup
    _, tok = load_model(str(model_dir))
    with pytest.raises(RemoteCaptureError, match="401"):
        capture_via_server(server.url, "wrong", tok, tmp / "x.parquet", num_samples=2, max_length=32)
    with pytest.raises(ValueError, match="admin token"):
        capture_via_server(server.url, None, tok, tmp / "x.parquet", num_samples=2)


def test_capture_server_command(setup, monkeypatch, capsys):
    from var_moe.cli import main

    tmp, model_dir, server = setup
    monkeypatch.setenv("VARMOE_ADMIN_TOKEN", server.admin_token)
    # no --model: the tokenizer of the model the server names in /v1/models
    assert main(["capture-server", "--server", server.url, "--split", "test", "--num-samples", "3",
                 "--max-length", "32", "--output", str(tmp / "cli.parquet")]) == 0
    df, meta = read_stats(tmp / "cli.parquet")
    assert meta["split"] == "test" and meta["sequences_sent"] == 3 and len(df) > 0

    assert main(["capture", "--server", server.url, "--output", str(tmp / "old.parquet")]) == 2
    assert "varmoe capture-server" in capsys.readouterr().err
