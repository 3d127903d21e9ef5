"""A capture killed after a checkpoint and resumed ends with exactly the statistics of an uninterrupted run."""

import subprocess
import sys
import time

import pytest
import torch
from stats_compare import compare_stats

from var_moe.capture.checkpoint import checkpoint_path, load_checkpoint
from var_moe.capture.job import CaptureConfig, CaptureInterrupted, run_capture
from var_moe.capture.schema import pairs_path, read_pairs, read_stats
from var_moe.capture.toy import make_toy_setup

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("toy"), family="mixtral", seed=0)


def config(toy, **kw):
    model_dir, corpus = toy
    fields = dict(model=str(model_dir), dataset=str(corpus), split="train", max_length=32, batch_size=4,
                  checkpoint_every=150)
    return CaptureConfig(**{**fields, **kw})


def assert_identical(a, b):
    (da, ma), (db, mb) = read_stats(a), read_stats(b)
    assert compare_stats(da, db) == []  # rtol 0: bit-identical floats too
    assert {k: v for k, v in ma.items() if k != "batches"} == {k: v for k, v in mb.items() if k != "batches"}
    assert compare_stats(read_pairs(pairs_path(a))[0], read_pairs(pairs_path(b))[0]) == []


def test_resume_after_interrupt_is_exact(toy, tmp_path):
    cfg = config(toy)
    full = run_capture(cfg, tmp_path / "full.parquet", progress=False, log=lambda s: None)
    out = tmp_path / "resumed.parquet"
    with pytest.raises(CaptureInterrupted):
        run_capture(cfg, out, progress=False, stop_after_batches=7, log=lambda s: None)
    ckpt = checkpoint_path(out)
    _, position, _ = load_checkpoint(ckpt)
    assert 0 < position.batches <= 7 and not out.exists()
    logs = []
    resumed = run_capture(cfg, out, resume=True, progress=False, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert resumed.tokens == full.tokens
    assert not ckpt.exists()  # the finished file supersedes the checkpoint
    assert_identical(tmp_path / "full.parquet", out)


def test_resume_refuses_another_config(toy, tmp_path):
    out = tmp_path / "s.parquet"
    with pytest.raises(CaptureInterrupted):
        run_capture(config(toy), out, progress=False, stop_after_batches=5, log=lambda s: None)
    with pytest.raises(ValueError, match="another configuration"):
        run_capture(config(toy, max_length=16), out, resume=True, progress=False, log=lambda s: None)


# `varmoe capture` whose first checkpoint write is followed by a long sleep: the test's SIGKILL always
# lands after one complete checkpoint and before the job ends (no race with a fast machine)
STALL_AFTER_CHECKPOINT = """
import sys, time
import var_moe.capture.job as job
_save = job.save_checkpoint
def save_then_stall(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(600)
job.save_checkpoint = save_then_stall
from var_moe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_process_resumes_exactly(toy, tmp_path):
    """A real SIGKILL of `varmoe capture` after its first checkpoint, then `--resume`."""
    model_dir, corpus = toy
    flags = ["capture", "--model", str(model_dir), "--dataset", str(corpus), "--split", "train", "--max-length", "32",
             "--batch-size", "4", "--checkpoint-every", "150", "--no-progress", "--threads", "1"]
    args = [sys.executable, "-m", "var_moe.cli", *flags]
    ref = tmp_path / "ref.parquet"
    subprocess.run(args + ["-o", str(ref)], check=True, capture_output=True)
    out = tmp_path / "killed.parquet"
    proc = subprocess.Popen([sys.executable, "-c", STALL_AFTER_CHECKPOINT, *flags, "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = checkpoint_path(out)
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    still_running = proc.poll() is None
    proc.kill()
    proc.wait()
    assert still_running and ckpt.exists() and not out.exists()
    subprocess.run(args + ["-o", str(out), "--resume"], check=True, capture_output=True)
    assert_identical(ref, out)
