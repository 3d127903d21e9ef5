"""`varmoe trace` and `varmoe simulate` end to end on the reference model (a few short sequences),
and their errors for bad flags. Run: `pytest tests/test_offload_cli.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from var_moe.cli import main
from var_moe.offload.simulator import POLICIES_ALL
from var_moe.offload.trace import Trace


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("offload")
    for split, n in (("test", 3), ("calibration", 6)):
        rc = main(["trace", "--split", split, "--num-samples", str(n), "--max-length", "48", "--threads", "1",
                   "--no-progress", "--output", str(d / f"{split}.parquet")])
        assert rc == 0
    return d


def test_trace_cli_writes_a_readable_trace(traces):
    tr = Trace.read(traces / "test.parquet")
    assert tr.num_layers == 4 and tr.top_k == 2 and tr.num_experts == 8
    assert len(np.unique(tr.seq_T)) == 3 and tr.has_spec and tr.metadata["shape"]["hidden"] == 128


def test_simulate_cli_all_policies(traces, capsys):
    out = traces / "sim.json"
    rc = main(["simulate", "--trace", str(traces / "test.parquet"), "--hardware", "rtx3060", "--cache-size", "2",
               "--policy", "all", "--calibration-trace", str(traces / "calibration.parquet"), "--output", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert tuple(doc["policies"]) == POLICIES_ALL
    printed = capsys.readouterr().out
    for name in POLICIES_ALL:
        assert 0 <= doc["policies"][name]["hit_rate"] <= 1 and doc["policies"][name]["tokens_per_s"] > 0
        assert f"\n{name} " in printed
    assert doc["policies"]["oracle"]["hit_rate"] == 1.0
    assert set(doc["predictors"]) >= {"var", "var_pair", "speculative", "prev_token", "oracle"}
    assert out.with_suffix(".png").exists() and out.with_suffix(".pdf").exists()


def test_simulate_on_mixtral_shape(traces, capsys):
    out = traces / "mix.json"
    rc = main(["simulate", "--trace", str(traces / "test.parquet"), "--shape", "mixtral-8x7b", "--policy", "lru,nocache",
               "--cache-size", "4", "--hardware", "t4", "--output", str(out), "--no-plot"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["policies"]["lru"]["layers"] == 32 and doc["layer_map"].startswith("cyclic")
    assert doc["policies"]["nocache"]["tokens_per_s"] < doc["policies"]["lru"]["tokens_per_s"]


def test_simulate_sizes_only_keeps_trace_depth(traces):
    """--sizes-only: the trace's layers and experts, the named shape's bytes per expert (no layer map)."""
    from var_moe.offload.hardware import OLMOE_1B_7B, QWEN3_30B_A3B

    docs = {}
    for shape in ("olmoe-1b-7b", "qwen3-30b-a3b"):
        out = traces / f"{shape}.json"
        assert main(["simulate", "--trace", str(traces / "test.parquet"), "--shape", shape, "--sizes-only",
                     "--policy", "lru", "--cache-size", "2", "--output", str(out), "--no-plot"]) == 0
        docs[shape] = json.loads(out.read_text())
    tr = Trace.read(traces / "test.parquet")
    for shape, ref in (("olmoe-1b-7b", OLMOE_1B_7B), ("qwen3-30b-a3b", QWEN3_30B_A3B)):
        got = docs[shape]
        assert got["layer_map"] is None and got["policies"]["lru"]["layers"] == tr.num_layers
        assert got["shape"]["num_experts"] == tr.num_experts and got["shape"]["top_k"] == tr.top_k
        assert (got["shape"]["hidden"], got["shape"]["intermediate"]) == (ref.hidden, ref.intermediate)
    # OLMoE's expert (3 x 2048 x 1024) is 4/3 of Qwen3's (3 x 2048 x 768): more bytes, fewer tokens/s
    assert OLMOE_1B_7B.expert_params * 3 == QWEN3_30B_A3B.expert_params * 4
    assert docs["olmoe-1b-7b"]["policies"]["lru"]["tokens_per_s"] < docs["qwen3-30b-a3b"]["policies"]["lru"]["tokens_per_s"]


@pytest.mark.parametrize("flags, message", [
    (["--hardware", "h100"], "--hardware"),
    (["--policy", "fifo"], "--policy"),
    (["--cache-size", "1"], "--cache-size"),
    (["--shape", "gpt5"], "--shape"),
    (["--sizes-only"], "--sizes-only"),
])
def test_simulate_bad_flags(traces, capsys, flags, message):
    rc = main(["simulate", "--trace", str(traces / "test.parquet"), "--output", str(traces / "x.json"), "--no-plot", *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_simulate_missing_trace(tmp_path, capsys):
    rc = main(["simulate", "--trace", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "x.json")])
    assert rc == 2 and "no such trace" in capsys.readouterr().err


def test_trace_cli_routing_array(tmp_path, capsys):
    np.save(tmp_path / "r.npy", np.random.default_rng(0).integers(0, 8, (20, 4, 2)))
    rc = main(["trace", "--routing-array", str(tmp_path / "r.npy"), "--output", str(tmp_path / "t.parquet")])
    assert rc == 2 and "--num-experts" in capsys.readouterr().err
    rc = main(["trace", "--routing-array", str(tmp_path / "r.npy"), "--num-experts", "8", "--output", str(tmp_path / "t.parquet")])
    assert rc == 0
    rc = main(["simulate", "--trace", str(tmp_path / "t.parquet"), "--shape", "mixtral-8x7b", "--policy", "speculative",
               "--output", str(tmp_path / "s.json"), "--no-plot"])
    assert rc == 2 and "no speculative predictions" in capsys.readouterr().err
