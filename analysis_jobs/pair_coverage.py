"""Held-out coverage of a (previous token, token) tier on top of the token tables, offline.

    python -m analysis_jobs.pair_coverage --evidence results/phase2/cache/evidence_calibration.safetensors \
        --choose-evidence results/phase2/cache/evidence_train250.safetensors \
        --test-evidence results/phase2/cache/evidence_test.safetensors \
        [--presets aggressive,balanced,conservative] [--min-pair-counts preset] [--prescreen on] \
        [--json results/phase2/pair_coverage.json]

Per preset (targets 0.8 / 0.9 / 0.95): the token tier as the preset builds it
(`VARTables.from_evidence`, the token candidates alone as the multiplicity family) against token +
pair tiers (`var_moe.var.pairs`): pair candidates chosen on the choosing evidence (at least
`--min-pair-counts` occurrences there; "preset" = the preset's frequency threshold), certified on
the calibration evidence with the token entries' rules (per-document cap, score test) and the
multiplicity rule over token and pair candidates as ONE family (`tables.certify_entries`); a pair
entry serves a row only where the token tier has no entry for the token. Scored on the test
evidence (the unmodified model's decisions on every test document): coverage and agreement of
served rows per layer and overall, 95% intervals by bootstrap over test documents
(`validation.served.score_served`). Prints a markdown table, writes JSON. Evidence files: see
docs/PHASE2.md ("Reproduce"); nothing here runs the model (it is loaded only for its identity).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _pct(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}% ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def _lines(head: str, sc: dict, token_sizes: dict | None, pair_served: dict | None) -> list[str]:
    """Markdown rows of one scored configuration: every layer, then all layers."""
    out = []
    for layer, r in list(sc["layers"].items()) + [("all", sc["overall"])]:
        def n(d):
            if d is None:
                return "-"
            return sum(int(x) for x in d.values()) if layer == "all" else int(d.get(layer, d.get(int(layer), 0)))
        meets = r.get("meets_target")
        meets = "" if layer == "all" else ("-" if meets is None else ("yes" if meets else "**no**"))
        out.append(f"{head}| {layer} | {n(token_sizes)} | {n(pair_served)} | {_pct(r['coverage'], r['coverage_ci95'])} | "
                   f"{_pct(r['agreement'], r['agreement_ci95'])} | {meets} |")
    return out


def joint_tables(cal, chooser, cfg, min_pair_count: int | None, prescreen: bool):
    """Token and pair tables certified as one family (the chooser decides `choose`)."""
    from var_moe.var.pairs import pair_candidates
    from var_moe.var.certify import layer_candidates
    from var_moe.var.tables import certify_entries

    choose = "even" if chooser is None else "separate"
    side = {l: (None if chooser is None else chooser.layers[l]) for l in cal.layers}
    cands = {l: layer_candidates(cal.layers[l], cfg, choose, side[l]) for l in cal.layers}
    pcands = {l: pair_candidates(cal.layers[l], cfg, min_pair_count, prescreen, choose, side[l]) for l in cal.layers}
    method = ("choose on even documents, certify on odd documents" if chooser is None else
              "choose on all documents of the choosing evidence, certify on all documents of the certifying evidence")
    return cands, pcands, certify_entries(cands, pcands, cfg, method + "; token and (previous, token) entries")


def score(test, tabs, ptabs, target, resamples):
    """Scores of the token rows, the pair rows and both, from the offline lookup."""
    from var_moe.validation.served import score_served
    from var_moe.var.pairs import served_masks

    masks = {l: served_masks(test.layers[l], tabs[l], ptabs.get(l)) for l in tabs}
    rows = {l: (test.layers[l].rows_R4, test.layers[l].counts_R) for l in tabs}
    pair_sizes = {l: (ptabs[l].size if l in ptabs else 0) for l in tabs}
    out = {}
    for name, parts in (("token", ("token",)), ("pair", ("pair",)), ("token+pair", ("token", "pair"))):
        per = {}
        for l, m in masks.items():
            srv = torch.stack([m[f"{p}_served"] for p in parts]).any(0)
            agr = torch.stack([m[f"{p}_agree"] for p in parts]).any(0)
            size = sum(tabs[l].size if p == "token" else pair_sizes[l] for p in parts)
            per[l] = (*rows[l], srv, agr, size)
        out[name] = score_served(per, target, resamples)
    return out


def router_check(model, tok, adapter, tables, num_batches: int) -> dict:
    """The router's fast rows (token entries) and pair rows per layer on the first test batches
    (back-to-back 256-token pieces) against the offline lookup (`served_masks`) on evidence of the
    same batches: decisions depend on token ids only, so the counts must be equal."""
    from var_moe.var.config import get_preset
    from var_moe.var.evaluate import eval_batches
    from var_moe.var.evidence import collect_evidence
    from var_moe.var.pairs import served_masks
    from var_moe.var.stack import C
    from var_moe.var.wrapper import VARModelWrapper

    meta = tables.metadata.get("certifying") or {}
    batches = eval_batches(tok, meta.get("dataset") or "stdlib", "test", None, 256, 8, max_per_doc=None)[:num_batches]
    ev = collect_evidence(model, batches, adapter)
    want = {}
    for l, t in tables.layers.items():
        m = served_masks(ev.layers[l], t, tables.pair_tier.get(l))
        w = ev.layers[l].counts_R
        want[l] = (int((w * m["token_served"]).sum()), int((w * m["pair_served"]).sum()))
    wrapper = VARModelWrapper(model, get_preset("balanced"), tables=tables)
    with torch.no_grad():
        for b in batches:
            wrapper(input_ids=b.ids, attention_mask=b.mask, use_cache=False)
    counts = wrapper.stack.counts()
    wrapper.restore()
    got = {l: (int(counts[i, C["fast"]] - counts[i, C["fast_pair"]]), int(counts[i, C["fast_pair"]]))
           for i, l in enumerate(wrapper.stack.layers)}
    return {"batches": num_batches, "tokens": int(ev.metadata["num_tokens"]),
            "offline_token_pair_rows": {str(l): v for l, v in want.items()},
            "router_token_pair_rows": {str(l): v for l, v in got.items()}, "equal": got == want}


def main() -> None:
    from var_moe.adapters import get_adapter
    from var_moe.loading import REFERENCE_MODEL_DIR, load_model
    from var_moe.validation.served import served_agreement
    from var_moe.var.config import get_preset
    from var_moe.var.evidence import Evidence
    from var_moe.var.tables import VARTables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REFERENCE_MODEL_DIR))
    ap.add_argument("--evidence", required=True, help="calibration evidence (certifies)")
    ap.add_argument("--choose-evidence", default=None, help="choosing evidence of another split (default: even/odd)")
    ap.add_argument("--test-evidence", required=True)
    ap.add_argument("--presets", default="aggressive,balanced,conservative")
    ap.add_argument("--min-pair-counts", default="preset",
                    help="comma-separated minimum pair counts on the choosing side; 'preset' = the preset's frequency threshold")
    ap.add_argument("--prescreen", default="on", choices=["on", "off", "on,off", "off,on"],
                    help="pair candidates only if their set's share on the choosing side reaches the target")
    ap.add_argument("--tables", nargs="*", default=[],
                    help="also score these tables files (token entries + their pair tier, as the router serves them)")
    ap.add_argument("--router-check-batches", type=int, default=0,
                    help="with --tables: run the router on this many test batches (8 x 256) and check that its token and "
                         "pair rows per layer equal the offline lookup on evidence of the same batches")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--json", default="results/phase2/pair_coverage.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    adapter = get_adapter(model)
    cal = Evidence.load(args.evidence)
    chooser = Evidence.load(args.choose_evidence) if args.choose_evidence else None
    test = Evidence.load(args.test_evidence)
    doc = {"evidence": args.evidence, "choose_evidence": args.choose_evidence, "test_evidence": args.test_evidence,
           "test_tokens": test.metadata.get("num_tokens"), "test_documents": test.metadata.get("num_documents"),
           "resamples": args.resamples, "runs": []}
    lines = ["| preset | target | min pair count | pre-screen | tiers | layer | token entries | pair entries served "
             "| coverage (95% CI) | agreement of served rows (95% CI) | meets target |", "|" + "---|" * 11]
    for name in args.presets.split(","):
        cfg = get_preset(name).replace(pair_entries=False)  # token entries alone; the pairs are joined below
        base = VARTables.from_evidence(cal, model, adapter, cfg, source=args.evidence, choose_evidence=chooser,
                                       choose_source=args.choose_evidence or "")
        alone = served_agreement(base, test, args.resamples)
        counts = [None if c == "preset" else int(c) for c in args.min_pair_counts.split(",")]
        for mpc in counts:
            for pre in args.prescreen.split(","):
                t0 = time.perf_counter()
                cands, pcands, (tabs, ptabs, info) = joint_tables(cal, chooser, cfg, mpc, pre == "on")
                s = score(test, tabs, ptabs, cfg.target_agreement, args.resamples)
                # pair entries that can serve: the token has no token entry
                v = next(iter(cal.layers.values())).vocab
                served = {l: int((~tabs[l].member_V[ptabs[l].keys_P % v]).sum()) for l in ptabs}
                nbytes = {l: int(served[l] * ptabs[l].served_bytes() / max(ptabs[l].size, 1)) for l in ptabs}
                run = {"preset": name, "target": cfg.target_agreement, "min_pair_count": mpc or cfg.frequency_threshold,
                       "prescreen": pre == "on", "verification": info, "token_alone": alone, "joint": s,
                       "pair_candidates_per_layer": {str(l): int(pcands[l].eligible_P.sum()) for l in pcands},
                       "pair_accepted_per_layer": {str(l): ptabs[l].size for l in ptabs},
                       "pair_served_entries_per_layer": {str(l): n for l, n in served.items()},
                       "pair_served_mb": sum(nbytes.values()) / 1e6,
                       "pair_served_mb_rule": "int64 key + int64 set (K) + float32 weights (K) per entry",
                       "seconds": time.perf_counter() - t0}
                doc["runs"].append(run)
                mpc_s = str(run["min_pair_count"])
                tok_sizes = {str(l): t.size for l, t in tabs.items()}
                for tiers, sc, te, pe in (("token alone (preset)", alone, base.sizes(), None),
                                          ("token (joint family)", s["token"], tok_sizes, None),
                                          ("pair rows", s["pair"], None, served), ("token + pair", s["token+pair"], tok_sizes, served)):
                    lines += _lines(f"| {name} | {cfg.target_agreement} | {mpc_s} | {pre} | {tiers} ", sc, te, pe)
                print(f"{name} min_pair_count={mpc_s} prescreen={pre}: token alone {100 * alone['overall']['coverage']:.2f}%, "
                      f"token+pair {100 * s['token+pair']['overall']['coverage']:.2f}% at "
                      f"{100 * (s['token+pair']['overall']['agreement'] or 0):.2f}%; pair entries served "
                      f"{sum(served.values())} ({run['pair_served_mb']:.3f} MB); {info}", flush=True)
    for path in args.tables:
        t = VARTables.load(path, model, adapter)
        sc = score(test, t.layers, t.pair_tier, (t.metadata.get("config") or {}).get("target_agreement"), args.resamples)
        served = {l: int((~t.layers[l].member_V[p.keys_P % p.keys_P.new_tensor(model.config.vocab_size)]).sum())
                  for l, p in t.pair_tier.items()}
        doc["runs"].append({"tables": path, "joint": sc, "pair_served_entries_per_layer": {str(l): n for l, n in served.items()},
                            "verification": t.metadata.get("verification")})
        for tiers in ("token", "pair", "token+pair"):
            lines += _lines(f"| {path} | {t.metadata['config']['target_agreement']} | - | - | {tiers} ", sc[tiers],
                            None if tiers == "pair" else t.sizes(), None if tiers == "token" else served)
    if args.router_check_batches and args.tables:
        doc["router_check"] = router_check(model, tok, adapter, VARTables.load(args.tables[-1], model, adapter),
                                           args.router_check_batches)
        print(f"router check ({args.tables[-1]}): {doc['router_check']}")
    print("\n".join(lines))
    doc["table_markdown"] = "\n".join(lines)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
