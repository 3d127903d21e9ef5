"""Exactness of VAR on vLLM, against plain vLLM and against the builtin engine, on the reference model.

- VAR off, and VAR on with empty tables: greedy tokens identical to plain vLLM (compiled engines,
  as served), and again after VAR was on;
- VAR on with the reference tables: outputs change, table rows counted on the device equal the
  table members among the tokens the model processed, every table row agrees with the learned
  decision's set or is counted as not agreeing (the audit), tables of other weights are refused;
- the same tables, same tokens, builtin engine (`VARModelWrapper`, fast tier only): the rows
  routed from the table and their experts are identical; learned-tier agreement is printed.

Runs in the vLLM environment only (`make test` runs it there); skipped where vLLM is absent.
Three engines start in subprocesses (plain compiled, VAR compiled, VAR eager): a few minutes.
Test: `.venv-vllm/bin/python -m pytest -q tests/vllm_engine/test_vllm_exact.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

import torch  # noqa: E402

from var_moe.var.tables import LayerTable, VARTables  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = ["The history of the city", "Once upon a time there was a", "In the beginning the river",
           "Water is", "The first thing to know about the market is that"]
MAX_TOKENS = 24


def run_engine(tmp: Path, name: str, spec: dict, env: dict | None = None) -> dict:
    spec_path, out_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(HERE / "engine_script.py"), str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=900, cwd=str(HERE.parent.parent),
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"engine {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, reference_model_dir):
    tmp = tmp_path_factory.mktemp("vllm_exact")
    tables_path = reference_model_dir / "var" / "var_tables.safetensors"
    real = VARTables.load(tables_path)
    vocab, k = real.metadata["vocab_size"], real.metadata["top_k"]
    empty = VARTables({l: LayerTable.empty(vocab, k) for l in real.layers}, dict(real.metadata))
    empty.save(tmp / "empty.safetensors")
    bad = VARTables(real.layers, {**real.metadata, "router_fingerprint": "0123456789abcdef"})
    bad.save(tmp / "bad.safetensors")
    base = {"model": str(reference_model_dir), "prompts": PROMPTS, "max_tokens": MAX_TOKENS,
            "tables": str(tables_path), "empty_tables": str(tmp / "empty.safetensors"),
            "bad_tables": str(tmp / "bad.safetensors")}
    return {
        "plain": run_engine(tmp, "plain", {**base, "var": False, "eager": False}),
        "var": run_engine(tmp, "var", {**base, "var": True, "eager": False}),
        "eager": run_engine(tmp, "eager", {**base, "var": True, "eager": True}),
        "tables": real,
    }


def test_var_off_and_empty_tables_reproduce_plain_vllm(runs):
    plain, var = runs["plain"]["plain"], runs["var"]
    assert var["off"] == plain
    assert var["empty"] == plain
    assert var["off_again"] == plain
    assert all(c[0] == 0 for c in var["counts_empty"].values())  # no table rows with empty tables
    assert all(c[0] == 0 for c in var["counts_off"].values())  # none with VAR off


def test_var_on_routes_table_rows_and_counts_them_on_the_device(runs):
    var, tables = runs["var"], runs["tables"]
    assert var["on"] != runs["plain"]["plain"]
    assert var["load"]["fingerprint"] == tables.metadata["router_fingerprint"]
    # rows the model processed: each prompt, then every generated token but the last
    rows = torch.tensor([t for ids, gen in zip(var["prompt_ids"], var["on"]) for t in ids + gen[:-1]])
    for layer, (fast, learned, agree, disagree) in var["counts_on"].items():
        expected = int(tables[int(layer)].member_V[rows].sum())
        assert fast == expected, f"layer {layer}: {fast} table rows counted, {expected} table members processed"
        assert fast + learned == len(rows)
        assert agree + disagree == fast
    assert sum(c[0] for c in var["counts_on"].values()) > 0


def test_tables_of_other_weights_are_refused(runs):
    err = runs["var"]["bad_tables_error"]
    assert err is not None and "router_fingerprint" in err
    # the refused file left the loaded tables in place
    assert {int(l): s for l, s in runs["var"]["info"]["table_sizes"].items()} == runs["tables"].sizes()


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory, reference_model_dir):
    """The VAR engine with tensor parallelism 2 (two CPU worker processes, one core each)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallelism 2 needs two cores")
    tmp = tmp_path_factory.mktemp("vllm_tp")
    real = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors")
    empty = VARTables({l: LayerTable.empty(real.metadata["vocab_size"], real.metadata["top_k"]) for l in real.layers},
                      dict(real.metadata))
    empty.save(tmp / "empty.safetensors")
    VARTables(real.layers, {**real.metadata, "router_fingerprint": "0123456789abcdef"}).save(tmp / "bad.safetensors")
    spec = {"model": str(reference_model_dir), "prompts": PROMPTS[:3], "max_tokens": 8, "var": True, "eager": True,
            "tables": str(reference_model_dir / "var" / "var_tables.safetensors"),
            "empty_tables": str(tmp / "empty.safetensors"), "bad_tables": str(tmp / "bad.safetensors"),
            "tensor_parallel_size": 2}
    return run_engine(tmp, "tp2", spec, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}), real


def test_tensor_parallel_ranks_route_the_same_rows(tp_run):
    """Each rank routes every row with the same replicated gate: identical counters on both ranks
    (the server counts them once), and they count the table members among the processed tokens."""
    run, tables = tp_run
    assert run["off"] == run["empty"] == run["off_again"]
    assert "router_fingerprint" in run["bad_tables_error"] and run["bad_tables_refused_by_all"]
    ranks = run["counts_on_ranks"]
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    rows = torch.tensor([t for ids, gen in zip(run["prompt_ids"], run["on"]) for t in ids + gen[:-1]])
    for layer, (fast, learned, agree, disagree) in ranks[0].items():
        assert fast == int(tables[int(layer)].member_V[rows].sum()) and fast + learned == len(rows)


def builtin_decisions(model_dir: Path, tables: VARTables, prompt_ids: list[list[int]]) -> list[dict]:
    """Per prompt and layer: tier and experts per row from the builtin VAR router (fast tier only)."""
    from var_moe.loading import load_model
    from var_moe.var import VARConfig, VARModelWrapper

    model, _ = load_model(str(model_dir), dtype="float32")
    config = VARConfig.from_dict(tables.metadata["config"]).replace(enable_cache=False, shadow_rate=0.0)
    wrapper = VARModelWrapper(model, config, tables)
    seen: dict[int, dict] = {}

    def hook(layer):
        def fn(module, args, output):
            seen[layer]["experts"] = output[2].tolist()
            # the rows this forward routed from the table (looked up once per forward for all layers)
            seen[layer]["fast"] = module.stack._last.fast_LT[module.slot].tolist()
        return fn

    for layer, router in wrapper.routers.items():
        router.register_forward_hook(hook(layer))
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            seen.clear()
            seen.update({l: {} for l in wrapper.routers})
            wrapper(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            out.append({l: dict(v) for l, v in seen.items()})
    wrapper.restore()
    return out


def test_table_rows_and_experts_equal_the_builtin_engine(runs, reference_model_dir):
    eager = runs["eager"]
    builtin = builtin_decisions(reference_model_dir, runs["tables"], eager["record_ids"])
    learned_same = learned_n = fast_n = 0
    for ids, rec, ref in zip(eager["record_ids"], eager["records"], builtin):
        for layer, calls in rec.items():
            (call,) = [c for c in calls if c["ids"] == ids]  # the prefill of this sequence
            b = ref[int(layer)]
            assert call["fast"] == b["fast"], f"layer {layer}: table rows differ for {ids}"
            for is_fast, v_exp, b_exp, v_learned in zip(call["fast"], call["experts"], b["experts"], call["learned"]):
                if is_fast:
                    fast_n += 1
                    assert v_exp == b_exp  # same table entry, same order
                else:
                    learned_n += 1
                    learned_same += sorted(v_exp) == sorted(b_exp)
    assert fast_n >= 20  # enough table rows for the comparison to mean something
    print(f"\nlearned-tier agreement vLLM vs builtin: {learned_same}/{learned_n} rows same expert set; "
          f"table rows identical: {fast_n}")
    assert learned_same / learned_n > 0.9  # kernels differ only at near-ties
