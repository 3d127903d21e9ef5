"""`varmoe capture` end to end on a toy model, its control, and flag errors (exit 2, message names the flag)."""

import pytest
import torch

from var_moe.capture.schema import pairs_path, read_stats
from var_moe.capture.toy import make_toy_setup
from var_moe.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_setup(tmp_path_factory.mktemp("toy"), family="qwen2_moe", seed=1)


def base(toy, out):
    model_dir, corpus = toy
    return ["capture", "--model", str(model_dir), "--dataset", str(corpus), "--split", "train", "--num_samples", "12",
            "--max_length", "24", "--batch-size", "4", "--no-progress", "-o", str(out)]


def test_capture_and_control(toy, tmp_path):
    out, ctl = tmp_path / "s.parquet", tmp_path / "c.parquet"
    assert main(base(toy, out)) == 0
    assert main(base(toy, ctl) + ["--control", "random-init", "--seed", "7"]) == 0
    df, meta = read_stats(out)
    cdf, cmeta = read_stats(ctl)
    assert pairs_path(out).exists()
    assert meta["model_type"] == "qwen2_moe" and meta["split"] == "train" and meta["control"] == "none"
    assert cmeta["control"] == "random-init" and "random-init" in cmeta["model"]
    assert meta["config"]["num_samples"] == 12 and meta["num_tokens"] == int(df[df.layer == 0].frequency.sum())
    # same tokens, different weights: identical frequencies, different routing
    assert df.frequency.tolist() == cdf.frequency.tolist()
    assert df.mean_entropy.tolist() != cdf.mean_entropy.tolist()
    assert (df.token_str.notna()).all()


@pytest.mark.parametrize("flag,value", [("--num-samples", "0"), ("--batch-size", "-1"), ("--max-length", "1"),
                                        ("--checkpoint-every", "0"), ("--pair-capacity", "1"), ("--split", "dev"),
                                        ("--num-samples", "many"), ("--control", "shuffled")])
def test_bad_flags_exit_2_naming_the_flag(toy, tmp_path, capsys, flag, value):
    args = base(toy, tmp_path / "x.parquet") + [flag, value]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    assert flag.lstrip("-").split("-")[0] in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(toy, tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("VARMOE_ADMIN_TOKEN", "t")
    model_dir, corpus = toy
    argv = ["capture-server", "--server", f"http://127.0.0.1:{port}", "--model", str(model_dir), "--dataset",
            str(corpus), "--split", "train", "-o", str(tmp_path / "x.parquet")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--server" in err and "cannot reach" in err and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["capture", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "x.parquet"), "--no-progress"]) == 2
    assert "nope" in capsys.readouterr().err
