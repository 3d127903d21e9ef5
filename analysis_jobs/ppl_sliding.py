"""The perplexity criterion over the whole test split on sliding windows, checkpointed: baseline
and any number of VAR table sets scored on the same windows, chunk by chunk, with per-document
NLL sums written after every chunk, so a run cut short still gives every document it finished.

    python -m analysis_jobs.ppl_sliding --threads 1 --shard 0/2 --output runs/ppl/shard0.json \
        --tables balanced=models/reference-moe/var/var_tables.safetensors \
        --tables loose=results/phase2/tables_loose.safetensors          # and --shard 1/2 beside it
    python -m analysis_jobs.ppl_sliding --merge runs/ppl/shard0.json runs/ppl/shard1.json \
        --output results/phase2/ppl_sliding.json [--against NAME]

A shard takes the documents whose index is congruent to it (so a partial run covers the whole
split evenly). Each VAR run uses the balanced preset's runtime settings (cache off) with the given
tables; the baseline is the unmodified model. `--merge` keeps the documents every table set
finished and reports perplexities and the paired bootstrap over them (`varmoe evaluate` does the
same in one piece, without checkpoints). Scoring: var_moe/var/eval_data.py (`window_batches`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _save(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    tmp.replace(path)


def run_shard(a: argparse.Namespace) -> None:
    import torch

    from var_moe.adapters import get_adapter
    from var_moe.corpus import encode_document, iter_documents
    from var_moe.loading import load_model
    from var_moe.var.config import get_preset
    from var_moe.var.eval_data import window_batches
    from var_moe.var.evaluate import batch_nll
    from var_moe.var.tables import VARTables
    from var_moe.var.wrapper import VARModelWrapper

    torch.set_num_threads(a.threads)
    i, n = (int(x) for x in a.shard.split("/"))
    model, tok = load_model(a.model)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    tables = {name: VARTables.load(path, model, adapter) for name, path in (t.split("=", 1) for t in a.tables)}
    cfg = get_preset("balanced")
    docs = [encode_document(tok, d.text) for d in iter_documents(a.dataset, a.split)]
    mine = [ids if d % n == i else [] for d, ids in enumerate(docs)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = window_batches(mine, a.max_length, a.stride, a.batch_size, pad)
    last_batch = {}  # document -> index of the batch holding its last window
    for j, b in enumerate(batches):
        for d in b.doc_B:
            last_batch[d] = j
    D = len(docs)
    sums = {k: (np.zeros(D), np.zeros(D)) for k in ["baseline", *tables]}
    fast = {k: [0.0, 0] for k in tables}
    out = {"shard": a.shard, "window": a.max_length, "stride": a.stride, "documents_in_shard": len(last_batch)}
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in range(0, len(batches), a.chunk):
            chunk = batches[c : c + a.chunk]
            runs = [("baseline", model, None)] + [(k, None, t) for k, t in tables.items()]
            for name, m, t in runs:
                w = VARModelWrapper(model, cfg, tables=t) if t is not None else None
                try:
                    for b in chunk:
                        nll, cnt = batch_nll(w or m, b, device)
                        np.add.at(sums[name][0], b.doc_B, nll.numpy())
                        np.add.at(sums[name][1], b.doc_B, cnt.double().numpy())
                    if w is not None:
                        o = w.get_performance_stats()["overall"]
                        fast[name][0] += o["routing_distribution"]["fast"] * o["calls"]
                        fast[name][1] += o["calls"]
                finally:
                    if w is not None:
                        w.restore()
            done = sorted(d for d, j in last_batch.items() if j < c + len(chunk))
            out.update({"complete_docs": done, "batches_done": c + len(chunk), "batches": len(batches),
                        "seconds": time.perf_counter() - t0,
                        "nll": {k: v[0][done].tolist() for k, v in sums.items()},
                        "count": {k: v[1][done].tolist() for k, v in sums.items()},
                        "fast_share": {k: f / max(calls, 1) for k, (f, calls) in fast.items()}})
            _save(Path(a.output), out)
            print(f"shard {a.shard}: {c + len(chunk)}/{len(batches)} batches, {len(done)} documents, "
                  f"{out['seconds']:.0f} s", flush=True)


def merge(a: argparse.Namespace) -> None:
    from var_moe.var.evaluate import paired_bootstrap

    shards = [json.loads(Path(p).read_text()) for p in a.merge]
    names = list(shards[0]["nll"])
    docs = [d for s in shards for d in s["complete_docs"]]
    nll = {k: np.concatenate([np.asarray(s["nll"][k]) for s in shards]) for k in names}
    cnt = {k: np.concatenate([np.asarray(s["count"][k]) for s in shards]) for k in names}
    ppl = {k: float(np.exp(nll[k].sum() / cnt[k].sum())) for k in names}
    result = {"scoring": {"method": "sliding windows", "window": shards[0]["window"], "stride": shards[0]["stride"],
                          "documents": len(docs), "documents_in_split": sum(s["documents_in_shard"] for s in shards),
                          "scored_tokens": int(cnt["baseline"].sum())},
              "complete": all(s["batches_done"] == s["batches"] for s in shards),
              "perplexity": ppl, "seconds_per_shard": [s["seconds"] for s in shards], "var": {}}
    for k in names[1:]:
        assert (cnt[k] == cnt["baseline"]).all()  # the same tokens scored in every run
        fast = sum(s["fast_share"][k] * s["batches_done"] for s in shards) / sum(s["batches_done"] for s in shards)
        result["var"][k] = {"perplexity_bootstrap": paired_bootstrap(nll["baseline"], cnt["baseline"], nll[k], cnt[k],
                                                                    a.bootstrap, 0),
                            "fast_share_of_fed_tokens_approx": fast}
    if a.against:  # each other table set against this one instead of the baseline, paired on the same documents
        if a.against not in names[1:]:
            raise SystemExit(f"--against {a.against!r} is not one of the merged table sets {names[1:]}")
        for k in names[1:]:
            if k != a.against:
                result["var"][k][f"perplexity_vs_{a.against}"] = paired_bootstrap(nll[a.against], cnt[a.against], nll[k],
                                                                                  cnt[k], a.bootstrap, 0)
    result["documents"] = sorted(docs)
    Path(a.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "documents"}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/reference-moe")
    p.add_argument("--dataset", default="stdlib")
    p.add_argument("--split", default="test")
    p.add_argument("--tables", action="append", default=[], help="NAME=PATH of a VAR tables file (repeatable)")
    p.add_argument("--shard", default="0/1", help="I/N: the documents whose index is I modulo N")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=8, help="batches between checkpoints")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--merge", nargs="+", default=None, help="shard files to merge instead of running")
    p.add_argument("--against", default=None, help="with --merge: also compare every other table set to this NAME")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    merge(a) if a.merge else run_shard(a)


if __name__ == "__main__":
    main()
