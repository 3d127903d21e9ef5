"""Tables certified in one dtype, served in another (var_moe.var.served_dtype, server start-up).

- `builtin_agreement` against a brute-force count (one sequence at a time, a Python loop over
  positions: token entry first, else the (previous, token) entry, compared with the router's own
  top-k set from a forward hook) on the reference model in bfloat16 and float32;
- `judge`: a layer with enough rows under the target fails and the message names the override;
  a layer with too few rows is reported but not judged; `certified_dtype` reads the tables first,
  then the checkpoint;
- `varmoe serve --dtype bfloat16` serves VAR from the committed (float32) tables, with the check
  measured and reported in /var/status, and fast decisions in /metrics; `--var-dtype-check` is
  validated.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from analysis_jobs.server_process import ManagedServer
from var_moe.adapters import get_adapter
from var_moe.loading import load_model
from var_moe.var import served_dtype as sd
from var_moe.var.tables import VARTables


def brute_force(model, tables, batches) -> dict[int, tuple[int, int]]:
    adapter = get_adapter(model)
    seen: dict[int, torch.Tensor] = {}
    hooks = [m.router.register_forward_hook(lambda mod, a, out, l=m.layer: seen.__setitem__(l, adapter.decision(out).topk_idx_TK))
             for m in adapter.moe_layers(model)]
    counts = {l: [0, 0] for l in tables.layers}
    vocab = int(model.config.vocab_size)
    try:
        for b in batches:
            for ids, mask in zip(b.ids, b.mask):
                seq = ids[mask.bool()]
                with torch.no_grad():
                    model(input_ids=seq[None])
                for l, t in tables.layers.items():
                    pairs = tables.pair_tier.get(l)
                    entry = {} if pairs is None else {int(k): i for i, k in enumerate(pairs.keys_P.tolist())}
                    for pos in range(len(seq)):
                        tok, prev = int(seq[pos]), int(seq[pos - 1]) if pos else -1
                        if bool(t.member_V[tok]):
                            served = sorted(t.experts_VK[tok].tolist())
                        elif prev >= 0 and prev * vocab + tok in entry:
                            served = sorted(pairs.sets_PK[entry[prev * vocab + tok]].reshape(-1).tolist())
                        else:
                            continue
                        counts[l][1] += 1
                        counts[l][0] += served == sorted(seen[l][pos].tolist())
    finally:
        for h in hooks:
            h.remove()
    return {l: tuple(c) for l, c in counts.items()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_builtin_agreement_matches_brute_force(reference_model_dir, dtype):
    model, tok = load_model(str(reference_model_dir), dtype=dtype)
    tables = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors", model)
    batches = sd.sample_batches(tables.metadata, tok, documents=4, max_length=128)
    got = sd.builtin_agreement(model, tables, batches)
    assert got == brute_force(model, tables, batches)
    assert sum(t for _, t in got.values()) > 0


def test_judge_and_certified_dtype(tmp_path):
    counts = {0: (95, 100), 1: (80, 100), 2: (1, 10)}
    c = sd.judge("bfloat16", "float32", counts, 0.9, "a sample")
    assert c.failed_layers == (1,) and not c.ok  # layer 2 has too few rows to judge
    assert sd.OVERRIDE in c.message() and "--dtype float32" in c.message()
    assert c.to_json()["layers"]["0"] == {"agree": 95, "rows": 100, "agreement": 0.95}
    assert sd.judge("bfloat16", "float32", {0: (95, 100)}, None, "s").ok  # default target 0.9
    assert sd.unchanged("float32", "float32").ok
    assert sd.certified_dtype({"dtype": "bfloat16"}, None) == "bfloat16"
    (tmp_path / "config.json").write_text('{"dtype": "float16"}')
    assert sd.certified_dtype({}, tmp_path) == "float16"


def test_builtin_server_in_bfloat16_serves_the_float32_tables(tmp_path):
    with ManagedServer(None, args=["--dtype", "bfloat16"], log_path=tmp_path / "server.log") as proc:
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            status = c.get("/var/status").json()
            check = status["var"]["dtype_check"]
            assert (check["served"], check["certified"], check["measured"], check["ok"]) == \
                ("bfloat16", "float32", True, True)
            assert sum(v["rows"] for v in check["layers"].values()) > 0
            r = c.post("/v1/generate", json={"prompt": "import os\nimport sys\n", "max_new_tokens": 8})
            assert r.status_code == 200 and r.json()["routing"]["fast"] > 0


def test_var_dtype_check_flag_is_validated(capsys):
    from var_moe.cli import main

    assert main(["serve", "--var-dtype-check", "sometimes", "--port", "0"]) == 2
    assert "--var-dtype-check" in capsys.readouterr().err
