"""Exactness of VAR on vLLM, against plain vLLM and against the builtin engine, on the reference model.

- VAR off, and VAR on with empty tables: greedy tokens identical to plain vLLM (compiled engines,
  as served), and again after VAR was on;
- VAR on with the reference tables: outputs change, table rows counted on the device equal the
  table members among the tokens the model processed, every table row agrees with the learned
  decision's set or is counted as not agreeing (the audit), tables of other weights are refused;
- the same tables, same tokens, builtin engine (`VARModelWrapper`, fast tier only): the rows
  routed from the table and their experts are identical; learned-tier agreement is printed;
- tables with (previous, token) entries (made up here on top of the reference tables: every bigram
  of the plain outputs, and every previous token before a few frequent tokens without a token
  entry): the device counters equal a plain-Python count of token and pair rows over the batched
  generation (decode steps included), a file over the engine's pair capacity is refused and leaves
  the loaded tables in place, and per prompt, prefill then decode step by step, the previous token
  of every row is the sequence's, and the pair rows, table rows and their experts equal the
  builtin engine's decoding the same tokens.

Runs in the vLLM environment only (`make test` runs it there); skipped where vLLM is absent.
Three engines start in subprocesses (plain compiled, VAR compiled, VAR eager), plus two for tensor
parallelism: a few minutes each.
Test: `.venv-vllm/bin/python -m pytest -q tests/vllm_engine/test_vllm_exact.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this environment (see make setup-vllm)")

import torch  # noqa: E402

from var_moe.var.evidence import set_codes  # noqa: E402
from var_moe.var.pairs import PairTable  # noqa: E402
from var_moe.var.tables import LayerTable, VARTables  # noqa: E402
from var_moe.vllm import PAIR_CAPACITY  # noqa: E402

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
    plain = run_engine(tmp, "plain", {**base, "var": False, "eager": False})
    pairs = synthetic_pair_tables(real, [ids + gen for ids, gen in zip(plain["prompt_ids"], plain["plain"])])
    pairs.save(tmp / "pairs.safetensors")
    over = VARTables(real.layers, dict(real.metadata))  # one entry more than the engine has room for
    over.pair_tier = {0: made_up_pairs(torch.arange(PAIR_CAPACITY + 1), real.metadata["num_experts"])}
    over.save(tmp / "over.safetensors")
    base |= {"pair_tables": str(tmp / "pairs.safetensors"), "over_tables": str(tmp / "over.safetensors")}
    return {
        "plain": plain,
        "var": run_engine(tmp, "var", {**base, "var": True, "eager": False}),
        "eager": run_engine(tmp, "eager", {**base, "var": True, "eager": True}),
        "tables": real,
        "pairs": pairs,
    }


def test_engine_kwargs_carry_the_pair_capacity(reference_model_dir):
    from var_moe.errors import InvalidInputError
    from var_moe.vllm import engine_kwargs

    assert engine_kwargs(str(reference_model_dir))["additional_config"]["varmoe"]["pair_capacity"] == PAIR_CAPACITY
    assert engine_kwargs(str(reference_model_dir), pair_capacity=0)["additional_config"]["varmoe"]["pair_capacity"] == 0
    with pytest.raises(InvalidInputError, match="pair_capacity"):
        engine_kwargs(str(reference_model_dir), pair_capacity=-1)


DENSE = 2  # per layer, this many frequent tokens without a token entry get an entry after every previous token


def made_up_pairs(keys_P: torch.Tensor, num_experts: int) -> PairTable:
    """Pair entries for sorted `keys_P` with sets and weights derived from the key (top-k 2). Not
    certified: the tests check that both engines serve the same entries, not that they are good."""
    a = keys_P % num_experts
    b = (a + 1 + (keys_P // num_experts) % (num_experts - 1)) % num_experts
    sets = torch.stack([a, b], 1)
    w0 = 0.55 + 0.4 * ((keys_P * 7919) % 1000).float() / 1000
    n = keys_P.numel()
    return PairTable(keys_P, sets, torch.stack([w0, 1 - w0], 1), torch.full((n,), 0.9),
                     set_codes(sets.sort(1).values, num_experts), torch.full((n,), 0.95),
                     torch.full((n,), 50.0, dtype=torch.float64), torch.full((n,), 50.0, dtype=torch.float64))


def synthetic_pair_tables(real: VARTables, sequences: list[list[int]]) -> VARTables:
    """The reference token tables plus made-up pair entries: every bigram of `sequences` (for member
    tokens too: never served, the token entry wins), and every previous token before the DENSE most
    frequent tokens of the sequences that have no token entry in the layer, so that generations
    which leave `sequences` (the entries change them) still meet entries while decoding."""
    v, e = real.metadata["vocab_size"], real.metadata["num_experts"]
    assert real.metadata["top_k"] == 2
    tables = VARTables(real.layers, dict(real.metadata))
    for l, t in real.layers.items():
        keys = {p * v + q for s in sequences for p, q in zip(s[:-1], s[1:])}
        freq = Counter(q for s in sequences for q in s if not bool(t.member_V[q]))
        for q, _ in freq.most_common(DENSE):
            keys |= {p * v + q for p in range(v)}
        tables.pair_tier[l] = made_up_pairs(torch.tensor(sorted(keys)), e)
    assert sum(tables.pair_sizes().values()) <= PAIR_CAPACITY
    return tables


def expected_rows(tables: VARTables, layer: int, seq: list[int]) -> tuple[list[bool], list[bool]]:
    """Plain-Python reference of one sequence's rows: (fast, pair) per row.
    A row is a pair row where its token has no token entry and (previous token, token) is an entry."""
    v = tables.metadata["vocab_size"]
    member = tables[layer].member_V.tolist()
    keys = set(tables.pair_tier[layer].keys_P.tolist()) if layer in tables.pair_tier else set()
    fast, pair = [], []
    for pos in range(len(seq)):
        is_pair = not member[seq[pos]] and pos > 0 and seq[pos - 1] * v + seq[pos] in keys
        fast.append(member[seq[pos]] or is_pair)
        pair.append(is_pair)
    return fast, pair


def test_var_off_and_empty_tables_reproduce_plain_vllm(runs):
    plain, var = runs["plain"]["plain"], runs["var"]
    assert var["off"] == plain
    assert var["empty"] == plain
    assert var["off_again"] == plain
    assert all(c[0] == 0 for c in var["counts_empty"].values())  # no table rows with empty tables
    assert all(c[0] == 0 for c in var["counts_off"].values())  # none with VAR off


def served_rows(tables: VARTables, seqs: list[list[int]], layer: int) -> int:
    """Plain count of the rows `layer`'s tables serve: a token entry, or else the (previous token,
    token) pair entry (none at a sequence start)."""
    t = tables[layer]
    pairs = set(tables.pair_tier[layer].keys_P.tolist()) if layer in tables.pair_tier else set()
    v = t.member_V.numel()
    n = 0
    for seq in seqs:
        for i, tok in enumerate(seq):
            n += bool(t.member_V[tok]) or (i > 0 and seq[i - 1] * v + tok in pairs)
    return n


def test_var_on_routes_table_rows_and_counts_them_on_the_device(runs):
    var, tables = runs["var"], runs["tables"]
    assert var["on"] != runs["plain"]["plain"]
    assert var["load"]["fingerprint"] == tables.metadata["router_fingerprint"]
    # rows the model processed: each prompt, then every generated token but the last
    seqs = [ids + gen[:-1] for ids, gen in zip(var["prompt_ids"], var["on"])]
    rows = torch.tensor([t for seq in seqs for t in seq])
    for layer, (fast, learned, agree, disagree) in var["counts_on"].items():
        expected = served_rows(tables, seqs, int(layer))  # the committed tables hold pair entries too
        assert fast == expected, f"layer {layer}: {fast} table rows counted, {expected} served rows processed"
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
    seqs = [ids + gen[:-1] for ids, gen in zip(run["prompt_ids"], run["on"])]
    for layer, (fast, learned, agree, disagree) in ranks[0].items():
        assert fast == served_rows(tables, seqs, int(layer)) and fast + learned == sum(map(len, seqs))


def builtin_decisions(model_dir: Path, tables: VARTables, prompt_ids: list[list[int]],
                      prefill: list[int] | None = None) -> list[dict]:
    """Per sequence and layer: table row?, pair row? and experts per row from the builtin VAR router
    (fast tier only). `prefill[i]`: sequence i's first that many tokens go in one forward, then one
    token per forward with the KV cache (decoding); default: all in one forward."""
    from var_moe.loading import load_model
    from var_moe.var import VARConfig, VARModelWrapper

    model, _ = load_model(str(model_dir), dtype="float32")
    config = VARConfig.from_dict(tables.metadata["config"]).replace(shadow_rate=0.0)
    wrapper = VARModelWrapper(model, config, tables)
    seen: dict[int, dict] = {}

    def hook(layer):
        def fn(module, args, output):
            look = module.stack._last  # looked up once per forward for all layers
            seen[layer]["experts"] += output[2].tolist()
            # the rows this forward routed from the table, and those of them served by a pair entry
            fast = look.fast_LT[module.slot].tolist()
            seen[layer]["fast"] += fast
            seen[layer]["pair"] += look.pair_LT[module.slot].tolist() if look.pair_LT is not None else [False] * len(fast)
        return fn

    for layer, router in wrapper.routers.items():
        router.register_forward_hook(hook(layer))
    out = []
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            seen.clear()
            seen.update({l: {"experts": [], "fast": [], "pair": []} for l in wrapper.routers})
            n = len(ids) if prefill is None else prefill[i]
            res = wrapper(input_ids=torch.tensor([ids[:n]]), attention_mask=torch.ones(1, n, dtype=torch.long),
                          use_cache=True)
            for j in range(n, len(ids)):  # decode steps: the previous token is carried by the tracker
                res = wrapper(input_ids=torch.tensor([[ids[j]]]), attention_mask=torch.ones(1, j + 1, dtype=torch.long),
                              past_key_values=res.past_key_values, use_cache=True)
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


def test_pair_rows_counted_on_the_device_equal_a_plain_lookup(runs):
    """Batched generation (compiled engine) with pair entries: per layer, the fast rows counted on
    the device are the token-entry rows plus the pair rows of a plain-Python walk over each
    sequence, so each decode row read its own request's previous token."""
    var, pairs = runs["var"], runs["pairs"]
    n_pairs = sum(pairs.pair_sizes().values())
    assert var["pair_load"]["pair_entries"] == n_pairs and var["pair_load"]["pair_capacity"] == PAIR_CAPACITY
    assert {int(l): s for l, s in var["pair_load"]["pair_sizes"].items()} == pairs.pair_sizes()
    seqs = [ids + gen[:-1] for ids, gen in zip(var["prompt_ids"], var["pairs_on"])]
    assert var["pairs_on"] != var["on"]  # the pair entries changed the outputs
    pair_n = carried_n = 0
    for layer, (fast, learned, agree, disagree) in var["counts_pairs"].items():
        want_fast = 0
        for ids, seq in zip(var["prompt_ids"], seqs):
            fast_rows, pair_rows = expected_rows(pairs, int(layer), seq)
            want_fast += sum(fast_rows)
            pair_n += sum(pair_rows)
            carried_n += sum(pair_rows[len(ids) + 1:])  # decode rows whose previous token was generated
        assert fast == want_fast, f"layer {layer}: {fast} fast rows counted, {want_fast} expected"
        assert fast + learned == sum(map(len, seqs)) and agree + disagree == fast
    assert pair_n > 0 and carried_n > 0, (pair_n, carried_n)


def test_tables_over_the_pair_capacity_are_refused(runs):
    var = runs["var"]
    err = var["over_error"]
    assert err and f"hold {PAIR_CAPACITY + 1} (previous, token) entries" in err and f"room for {PAIR_CAPACITY}" in err
    # nothing of the refused file was written: the pair tables loaded before are still served
    assert var["info_pairs"]["pair_entries"] == sum(runs["pairs"].pair_sizes().values())
    assert {int(l): s for l, s in var["info_pairs"]["table_sizes"].items()} == runs["pairs"].sizes()


def test_pair_rows_and_experts_equal_the_builtin_engine_prefill_and_decode(runs, reference_model_dir):
    """Each prompt generated on its own (eager engine, VAR on, pair entries), every forward
    recorded: the prefill, then one row per decode step. Each row's previous token is the
    sequence's (the token at position - 1, -1 at the start); table rows, pair rows and their
    experts equal the builtin engine's prefilling the prompt and decoding the same tokens."""
    eager, pairs = runs["eager"], runs["pairs"]
    seqs = [ids + run["gen"][:-1] for ids, run in zip(eager["prompt_ids"], eager["pair_runs"])]
    builtin = builtin_decisions(reference_model_dir, pairs, seqs, prefill=[len(ids) for ids in eager["prompt_ids"]])
    pair_n = carried_n = fast_n = learned_n = learned_same = 0
    for ids, seq, run, ref in zip(eager["prompt_ids"], seqs, eager["pair_runs"], builtin):
        for layer, calls in run["records"].items():
            assert calls[0]["ids"] == ids and all(len(c["ids"]) == 1 for c in calls[1:])  # prefill, then decodes
            rows = {key: [x for c in calls for x in c[key]] for key in ("ids", "prev", "fast", "pair", "experts", "learned")}
            assert rows["ids"] == seq
            assert rows["prev"] == [-1] + seq[:-1], f"layer {layer}: previous tokens differ from the sequence's"
            b = ref[int(layer)]
            assert rows["fast"] == b["fast"], f"layer {layer}: table rows differ for {seq}"
            assert rows["pair"] == b["pair"], f"layer {layer}: pair rows differ for {seq}"
            assert (rows["fast"], rows["pair"]) == expected_rows(pairs, int(layer), seq)
            for is_fast, v_exp, b_exp in zip(rows["fast"], rows["experts"], b["experts"]):
                if is_fast:
                    fast_n += 1
                    assert v_exp == b_exp  # same entry, same order
                else:
                    learned_n += 1
                    learned_same += sorted(v_exp) == sorted(b_exp)
            pair_n += sum(rows["pair"])
            carried_n += sum(rows["pair"][len(ids) + 1:])
    print(f"\npair entries: {pair_n} pair rows ({carried_n} with a generated previous token), {fast_n} table rows "
          f"identical; learned-tier agreement vLLM vs builtin {learned_same}/{learned_n}")
    assert pair_n > 0 and carried_n > 0, (pair_n, carried_n)
    assert learned_same / learned_n > 0.9  # kernels differ only at near-ties
