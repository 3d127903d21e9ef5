"""Runs one vLLM engine in its own process for the tests and writes what it saw as JSON.

    python tests/vllm_engine/engine_script.py SPEC.json OUT.json

SPEC: {"model", "prompts", "max_tokens", "var": bool, "eager": bool, "tables", "empty_tables",
"bad_tables", optional "tensor_parallel_size", "pair_tables", "over_tables"}. A plain engine ("var": false) generates greedily once. A VAR engine generates with
VAR off, on with empty tables, on with the real tables, off again, and records counters after each;
eager VAR engines also record per-row decisions of one prefill per prompt + its VAR continuation.
With "pair_tables" (tables with (previous, token) entries), a VAR engine then loads them, generates
with VAR on and records counters, and refuses "over_tables" (more pair entries than its capacity);
an eager one also records every forward of each prompt's generation on its own (the prefill, then
each decode step). A fresh process per
engine keeps vLLM's global state (distributed groups, compile caches) apart between engines.
Used by tests/vllm_engine/test_vllm_exact.py.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    spec = json.load(open(spec_path, encoding="utf-8"))
    # no prefix cache: a prompt seen with VAR off must be recomputed with VAR on (and counted)
    common = {"dtype": "float32", "max_model_len": 512, "enforce_eager": spec["eager"], "seed": 0,
              "enable_prefix_caching": False, "tensor_parallel_size": spec.get("tensor_parallel_size", 1)}
    if spec["var"]:
        from var_moe.vllm import engine_kwargs

        llm = LLM(**engine_kwargs(spec["model"], **common))
    else:
        llm = LLM(model=spec["model"], **common)
    prompts = spec["prompts"]
    tok = llm.get_tokenizer()
    out: dict = {"prompt_ids": [tok(p)["input_ids"] for p in prompts]}
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])

    def generate() -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]

    if not spec["var"]:
        out["plain"] = generate()
        json.dump(out, open(out_path, "w", encoding="utf-8"))
        return

    rpc = llm.collective_rpc
    counts = lambda: {str(k): v for k, v in rpc("varmoe_counts")[0].items()}  # noqa: E731
    rpc("varmoe_reset_counts")  # start-up and profiling runs are not traffic
    out["off"] = generate()
    out["counts_off"] = counts()
    rpc("varmoe_load_tables", args=(spec["empty_tables"],))
    rpc("varmoe_set_enabled", args=(True,))
    rpc("varmoe_reset_counts")
    out["empty"] = generate()
    out["counts_empty"] = counts()
    out["load"] = rpc("varmoe_load_tables", args=(spec["tables"],))[0]
    rpc("varmoe_reset_counts")
    out["on"] = generate()
    out["counts_on"] = counts()
    out["counts_on_ranks"] = [{str(k): v for k, v in rank.items()} for rank in rpc("varmoe_counts")]
    rpc("varmoe_set_enabled", args=(False,))
    out["off_again"] = generate()
    refused = [r.get("error") for r in rpc("varmoe_load_tables", args=(spec["bad_tables"],))]
    out["bad_tables_error"] = refused[0]  # every rank refuses them
    out["bad_tables_refused_by_all"] = all(refused)
    out["info"] = rpc("varmoe_info")[0]
    if spec["eager"]:
        # one prefill per sequence, of each prompt followed by its VAR-mode continuation (more table
        # tokens than the prompts alone): the rows of that forward are exactly those tokens
        rpc("varmoe_set_enabled", args=(True,))
        out["record_ids"] = [ids + gen for ids, gen in zip(out["prompt_ids"], out["on"])]
        out["records"] = []
        for ids in out["record_ids"]:
            rpc("varmoe_record", args=(True,))
            llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
            out["records"].append({str(k): v for k, v in rpc("varmoe_records")[0].items()})
        rpc("varmoe_record", args=(False,))
    if spec.get("pair_tables"):
        pair_phase(llm, spec, out, generate, counts)
    json.dump(out, open(out_path, "w", encoding="utf-8"))


def pair_phase(llm, spec: dict, out: dict, generate, counts) -> None:
    """(previous, token) entries: batched generation with counters, the over-capacity refusal, and
    (eager) each prompt's prefill + decode steps recorded row by row."""
    from vllm import SamplingParams

    rpc = llm.collective_rpc
    rpc("varmoe_set_enabled", args=(True,))
    out["pair_load"] = rpc("varmoe_load_tables", args=(spec["pair_tables"],))[0]
    rpc("varmoe_reset_counts")
    out["pairs_on"] = generate()
    out["counts_pairs"] = counts()
    out["over_error"] = rpc("varmoe_load_tables", args=(spec["over_tables"],))[0].get("error")
    out["info_pairs"] = rpc("varmoe_info")[0]  # the refused file left the pair tables in place
    if spec["eager"]:
        out["pair_runs"] = []
        for ids in out["prompt_ids"]:
            rpc("varmoe_record", args=(True,))
            res = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"]),
                               use_tqdm=False)
            out["pair_runs"].append({"gen": list(res[0].outputs[0].token_ids),
                                     "records": {str(k): v for k, v in rpc("varmoe_records")[0].items()}})
        rpc("varmoe_record", args=(False,))


if __name__ == "__main__":  # vLLM may spawn workers that import this file
    main(sys.argv[1], sys.argv[2])
