"""Baseline vs VAR evaluation on held-out text: perplexity, throughput, latency, agreement.

`evaluate_quality_and_speed(model, tokenizer, mode, ...)` returns the JSON document `varmoe evaluate` writes:
- evaluation: perplexity of the (VAR or baseline) model, padding masked, per-document sums kept
  for a paired bootstrap; `scoring` says how the tokens were scored (eval_data.py);
- throughput: tokens/s and per-batch latency percentiles (p50/p95/p99) after warm-up, median
  over repeats, over the first `timing_batches` batches (default all);
- var mode only: the unmodified model (original routers, no hooks) runs on the same batches in
  the same process, interleaved with VAR batch by batch (`paired_times`), giving the paired speed
  ratio `paired.speedup` and the paired perplexity difference with a bootstrap CI over
  documents; an untimed audit pass counts how often fast decisions equal the learned
  router's (exact top-k set, overlap); `var_stats` holds the wrapper's per-layer statistics.
Test: `pytest tests/test_var_eval.py tests/test_var_sweep.py tests/test_var_sliding.py`.
"""

from __future__ import annotations

import math
import platform
import statistics
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError
from ..perplexity import token_nll
from ..timing import Variant, interleaved
from .config import VARConfig
from .eval_data import EvalBatch, eval_batches, sliding_batches  # noqa: F401  (re-exported: the evaluation's inputs)


def batch_nll(model: Any, b: EvalBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed scored NLL (nats, float64) and counts of one evaluation batch (`perplexity.token_nll`)."""
    nll, keep = token_nll(model, b.ids, b.mask, b.score_from_B, device)
    return nll.sum(1), keep.sum(1)


def _per_doc(batches: list[EvalBatch], nll_rows: list[torch.Tensor], n_rows: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-document summed NLL and scored-token counts from per-batch rows (`batch_nll`)."""
    docs = np.concatenate([np.asarray(b.doc_B) for b in batches])
    _, inv = np.unique(docs, return_inverse=True)
    nll = np.bincount(inv, weights=torch.cat(nll_rows).numpy())
    cnt = np.bincount(inv, weights=torch.cat(n_rows).double().numpy())
    return nll, cnt


def doc_nll(model: Any, batches: list[EvalBatch], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-document summed NLL and scored-token counts of `model` over `batches`."""
    return _per_doc(batches, *zip(*[batch_nll(model, b, device) for b in batches]))


def paired_bootstrap(base_nll: np.ndarray, base_n: np.ndarray, var_nll: np.ndarray, var_n: np.ndarray,
                     resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Relative perplexity difference (VAR / baseline - 1, %) resampling documents with replacement."""
    rng = np.random.default_rng(seed)
    d = len(base_nll)
    pick = rng.integers(0, d, size=(resamples, d))
    ppl = lambda nll, n: np.exp(nll[pick].sum(1) / np.maximum(n[pick].sum(1), 1))  # noqa: E731
    diff = 100 * (ppl(var_nll, var_n) / ppl(base_nll, base_n) - 1)
    point = 100 * (math.exp(var_nll.sum() / var_n.sum()) / math.exp(base_nll.sum() / base_n.sum()) - 1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"diff_pct": point, "ci95_pct": [float(lo), float(hi)], "resamples": resamples, "documents": d}


@torch.no_grad()
def forward(model: Any, b: EvalBatch, device: torch.device) -> None:
    """One evaluation forward of batch `b` (what the timed passes time)."""
    model(input_ids=b.ids.to(device), attention_mask=b.mask.to(device))


def paired_times(model: Any, wrapper: Any, batches: list[EvalBatch], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, list[list[float]]]:
    """Seconds per batch forward of the unmodified model ("base": VAR suspended, original routers,
    no hooks) and of VAR ("var"), interleaved batch by batch in rotating order (`var_moe.timing`)."""
    return interleaved({"base": Variant(lambda i: forward(model, batches[i], device), around=wrapper.suspended),
                        "var": Variant(lambda i: forward(wrapper, batches[i], device))},
                       len(batches), repeats, warmup, device=device)


def speed_ratios(times: dict[str, list[list[float]]]) -> list[float]:
    """Baseline / VAR seconds of each repeat of `paired_times` (the paired speed ratio)."""
    return [sum(tb) / sum(tv) for tb, tv in zip(times["base"], times["var"])]


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "device": str(device), "machine": platform.machine(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def evaluate_quality_and_speed(model: Any, tokenizer: Any, mode: str, batches: list[EvalBatch], config: VARConfig | None = None,
             tables: Any = None, repeats: int = 3, warmup: int = 1, bootstrap: int = 2000, seed: int = 0,
             info: dict[str, Any] | None = None, timing_batches: int | None = None,
             scoring: dict[str, Any] | None = None) -> dict[str, Any]:
    """Perplexity over all `batches`; the timed passes replay the first `timing_batches` of them
    (None = all). `scoring` (from `eval_data.scoring_info`) is recorded with the scored tokens."""
    if mode not in ("baseline", "var"):
        raise InvalidInputError(f"--mode must be baseline or var, got {mode!r}")
    if repeats < 1 or warmup < 0:
        raise InvalidInputError("--repeats must be >= 1 and --warmup >= 0")
    if timing_batches is not None and timing_batches < 1:
        raise InvalidInputError(f"--timing-batches must be >= 1, got {timing_batches}")
    device = next(model.parameters()).device
    timed = batches[:timing_batches]
    tokens = sum(b.tokens for b in timed)
    result: dict[str, Any] = {"mode": mode, **(info or {}), "sequences": sum(len(b.doc_B) for b in batches),
                              "tokens": sum(b.tokens for b in batches), "environment": _environment(device)}
    if mode == "baseline":
        nll, cnt = doc_nll(model, batches, device)
        times = interleaved({"base": Variant(lambda i: forward(model, timed[i], device))}, len(timed), repeats, warmup,
                            device=device)["base"]
        result["evaluation"] = _ppl_block(nll, cnt)
        result["scoring"] = _scoring(scoring, nll, cnt)
        result["throughput"] = _tput(tokens, times, warmup)
        return result

    from .wrapper import VARModelWrapper

    config = config or VARConfig()
    with VARModelWrapper(model, config, tables=tables) as wrapper:
        # 1) quality + audit pass (untimed): baseline and VAR on the same batches
        wrapper.reset_stats()
        wrapper.set_audit(True)
        with wrapper.suspended():
            b_nll, b_cnt = doc_nll(model, batches, device)
        v_nll, v_cnt = doc_nll(wrapper, batches, device)
        wrapper.set_audit(False)
        stats = wrapper.get_performance_stats()
        # 2) timing; shadow demotion must not change the tables between timed repeats
        with wrapper.frozen_tables():
            times = paired_times(model, wrapper, timed, device, repeats, warmup)
    result["config"] = config.to_dict()
    result["table_sizes"] = {str(l): n for l, n in wrapper.table_sizes().items()}
    result["evaluation"] = _ppl_block(v_nll, v_cnt)
    result["scoring"] = _scoring(scoring, b_nll, b_cnt)
    result["throughput"] = _tput(tokens, times["var"], warmup)
    per_rep = speed_ratios(times)
    result["paired"] = {
        "baseline_evaluation": _ppl_block(b_nll, b_cnt),
        "baseline_throughput": _tput(tokens, times["base"], warmup),
        "speedup": statistics.median(per_rep),
        "speedup_per_repeat": per_rep,
        "speedup_batch_median": statistics.median(b / v for tb, tv in zip(times["base"], times["var"])
                                                  for b, v in zip(tb, tv)),
        "perplexity_bootstrap": paired_bootstrap(b_nll, b_cnt, v_nll, v_cnt, bootstrap, seed),
        "method": "same process, batches interleaved with rotating order (var_moe.timing); baseline = original routers, no hooks",
    }
    fast, calls = stats["overall"]["audit_fast"], stats["overall"]["calls"]
    # learned decisions agree with themselves; share of all (token, layer) decisions equal to learned
    wrong = fast["n"] - (fast["exact_agreement"] or 0) * fast["n"]
    result["agreement"] = {"fast": fast, "all_decisions_exact": 1 - wrong / calls if calls else None,
                           "note": "local agreement: the learned router evaluated on the same hidden states VAR saw"}
    result["var_stats"] = stats
    return result


def _ppl_block(nll: np.ndarray, cnt: np.ndarray) -> dict[str, Any]:
    mean = float(nll.sum() / max(cnt.sum(), 1))
    return {"perplexity": math.exp(mean), "mean_nll_nats": mean, "predicted_tokens": int(cnt.sum()), "documents": len(nll)}


def _scoring(scoring: dict[str, Any] | None, nll: np.ndarray, cnt: np.ndarray) -> dict[str, Any]:
    return {**(scoring or {"method": "as batched by the caller"}), "documents": len(nll), "scored_tokens": int(cnt.sum())}


def _tput(tokens: int, times: list[list[float]], warmup: int) -> dict[str, Any]:
    """Throughput of one variant from its seconds per repeat and batch (`times[repeat][batch]`)."""
    per_rep = [sum(t) for t in times]
    med = statistics.median(per_rep)
    ms = np.asarray([x for t in times for x in t]) * 1000
    latency = {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
               "p99": float(np.percentile(ms, 99)), "unit": "ms per batch forward", "samples": len(ms)}
    return {"tokens_per_second": tokens / med, "seconds_per_pass_median": med, "seconds_per_pass": per_rep,
            "repeats": len(times), "warmup_batches": warmup, "batches_timed": len(times[0]), "tokens_per_pass": tokens,
            "latency": latency}
