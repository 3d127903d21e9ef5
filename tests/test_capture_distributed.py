"""Two-process data-parallel capture (torchrun, gloo) equals one process: integers exactly, moments to rounding."""

import os
import subprocess
import sys

import pytest
import torch
from stats_compare import compare_stats

from var_moe.capture.job import CaptureConfig, run_capture
from var_moe.capture.schema import pairs_path, read_pairs, read_stats
from var_moe.capture.toy import make_toy_setup

torch.set_num_threads(1)
INT_COLUMNS = ["layer", "token_id", "frequency", "expert_ids", "top1_counts", "topk_counts", "top_expert", "modal_topk_set",
               "modal_set_count", "topk_set_ids", "topk_set_counts"]


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(tmp_path):
    model_dir, corpus = make_toy_setup(tmp_path / "toy", family="mixtral", seed=4)
    flags = ["--model", str(model_dir), "--dataset", str(corpus), "--split", "train", "--max-length", "32",
             "--batch-size", "3", "--no-progress", "--threads", "1"]
    out = tmp_path / "dp.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "var_moe.cli", "capture", *flags, "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # both ranks did part of the work
        line = next(x for x in proc.stdout.splitlines() if f"rank {rank} of 2: forwarded" in x)
        assert int(line.split("forwarded ")[1].split()[0]) > 0
    single = tmp_path / "one.parquet"
    cfg = CaptureConfig(model=str(model_dir), dataset=str(corpus), split="train", max_length=32, batch_size=3)
    run_capture(cfg, single, progress=False, log=lambda s: None)
    (dp, dmeta), (one, ometa) = read_stats(out), read_stats(single)
    assert compare_stats(dp[INT_COLUMNS], one[INT_COLUMNS]) == []
    assert compare_stats(dp, one, rtol=1e-10, atol=1e-12) == []
    for key in ("num_tokens", "padding_excluded", "consecutive"):
        assert dmeta[key] == ometa[key], key
    assert compare_stats(read_pairs(pairs_path(out))[0], read_pairs(pairs_path(single))[0]) == []
    assert not list(tmp_path.glob("*.ckpt*"))
