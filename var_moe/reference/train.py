"""Train the reference MoE from scratch on CPU: corpus -> BPE tokenizer -> MixtralForCausalLM.

Run: `varmoe train-reference --work-dir runs/reference --output models/reference-moe`
(resumes from the newest checkpoint in --work-dir; `--max-steps` overrides the recipe).
Checkpoints are safetensors (model + AdamW moments) plus JSON (step, RNG-free data order: the
batch of step s is drawn from a generator seeded with (seed, s), so a resumed run sees exactly the
batches an uninterrupted one would). Log: `train_log.jsonl` in the work dir.

Test: `pytest tests/test_reference_train.py` (a few steps of a tiny recipe, kill + resume).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..corpus import iter_documents, tokenize_documents
from ..errors import InvalidInputError
from .recipe import Recipe
from .tokenizer import special_ids, train_tokenizer


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, top1_weight: float) -> torch.Tensor:
    """Switch-style balancing loss computed for each layer separately, then averaged.

    transformers' loss pools expert counts over layers before normalising, so one layer can
    collapse onto a few experts while the pooled loss looks healthy.
    """
    losses = []
    for logits_TE in router_logits:
        num_experts = logits_TE.shape[-1]
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        topk_TK = probs_TE.topk(top_k, dim=-1).indices
        slots_E = torch.bincount(topk_TK.reshape(-1), minlength=num_experts).float() / topk_TK.numel()
        top1_E = torch.bincount(topk_TK[:, 0], minlength=num_experts).float() / topk_TK.shape[0]
        share_E = (1 - top1_weight) * slots_E + top1_weight * top1_E
        losses.append(num_experts * (share_E * probs_TE.mean(0)).sum())
    return torch.stack(losses).mean()


def min_top1_share(router_logits: tuple[torch.Tensor, ...]) -> float:
    """Lowest share of top-1 choices any expert gets in any layer (on this batch): collapse shows early."""
    lowest = 1.0
    with torch.no_grad():
        for logits_TE in router_logits:
            counts = torch.bincount(logits_TE.argmax(-1), minlength=logits_TE.shape[-1])
            lowest = min(lowest, float(counts.min()) / logits_TE.shape[0])
    return lowest


def schedule_progress(step: int, r: Recipe, seconds: float = 0.0) -> float:
    """Fraction of training done: by steps, or by the time budget when that is further along."""
    progress = (step - r.warmup_steps) / max(1, r.max_steps - r.warmup_steps)
    if r.time_budget_s:
        progress = max(progress, seconds / r.time_budget_s)
    return min(1.0, progress)


def lr_at(step: int, r: Recipe, seconds: float = 0.0) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = schedule_progress(step, r, seconds)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_for_step(tokens: torch.Tensor, step: int, r: Recipe) -> torch.Tensor:
    """Windows of seq_len + 1 tokens; deterministic in (seed, step) so resume replays exactly."""
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - r.seq_len - 1, (r.batch_size,), generator=g)
    idx = starts[:, None] + torch.arange(r.seq_len + 1)[None, :]
    return tokens[idx].long()


def prepare_data(work: Path, r: Recipe, log: Callable[[str], None]) -> tuple[Any, torch.Tensor]:
    """Train the tokenizer and tokenize the train split once; both are cached in the work dir."""
    from transformers import AutoTokenizer

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        log(f"training a byte-level BPE tokenizer (vocab {r.vocab_size}) on the {r.dataset} train split")
        train_tokenizer((d.text for d in iter_documents(r.dataset, "train")), r.vocab_size, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cache = work / "train_tokens.npy"
    if not cache.exists():
        log("tokenizing the train split")
        ids = [t for doc in tokenize_documents(tokenizer, iter_documents(r.dataset, "train")) for t in doc]
        np.save(cache, np.asarray(ids, dtype=np.uint16 if r.vocab_size < 65536 else np.int32))
    tokens = torch.from_numpy(np.load(cache, allow_pickle=False).astype(np.int64))
    log(f"{tokens.numel():,} training tokens")
    return tokenizer, tokens


def train_token_counts(work_dir: str | Path, vocab_size: int) -> torch.Tensor | None:
    """Unigram counts of the cached train-split tokens (equal to `perplexity.unigram_counts` on the
    same tokenizer and split: both tokenize each document with its EOS), or None without a cache."""
    cache = Path(work_dir) / "train_tokens.npy"
    if not cache.exists():
        return None
    ids = torch.from_numpy(np.load(cache, allow_pickle=False).astype(np.int64))
    return torch.bincount(ids, minlength=vocab_size).double()


def save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = work / "ckpt.tmp"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    opt_tensors: dict[str, torch.Tensor] = {}
    for i, st in optimizer.state_dict()["state"].items():
        for key, val in st.items():
            opt_tensors[f"{i}.{key}"] = val if torch.is_tensor(val) else torch.tensor(val)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    final = work / "ckpt"
    if final.exists():
        old = work / "ckpt.old"
        final.rename(old)
        tmp.rename(final)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(final)


def load_checkpoint(work: Path, model, optimizer) -> dict | None:
    from safetensors.torch import load_file

    ckpt = work / "ckpt"
    if not (ckpt / "state.json").exists():
        return None
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    flat = load_file(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = val
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)
    return json.loads((ckpt / "state.json").read_text())


def build_model(r: Recipe, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(r.seed)
    config = r.model_config(special_ids(tokenizer))
    return AutoModelForCausalLM.from_config(config, experts_implementation=r.experts_implementation)


def main_done(state: dict, r: Recipe) -> bool:
    """The main stage ends at max_steps, or when the time budget (if any) is spent."""
    return state["step"] >= r.max_steps or bool(r.time_budget_s and state["train_seconds"] >= r.time_budget_s)


def done(state: dict, r: Recipe) -> bool:
    """Training ends when the main stage and the final balancing stage (`finish_steps`) are done."""
    return main_done(state, r) and state.get("finish_step", 0) >= r.finish_steps


def train(r: Recipe, work_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print,
          stop_after: int | None = None) -> tuple[Any, Any, dict]:
    """Run (or resume) training to `r.max_steps` or the time budget; `state["finished"]` says which
    runs are complete. `stop_after` ends early (tests simulate a kill)."""
    from tqdm import tqdm

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(r.threads)
    recipe_file = work / "recipe.json"
    # only the step count, time budget and final stage may change between runs of one work dir (training on)
    if recipe_file.exists() and replace(Recipe.from_json(recipe_file.read_text()), max_steps=r.max_steps,
                                        time_budget_s=r.time_budget_s, finish_steps=r.finish_steps,
                                        finish_balance_coef=r.finish_balance_coef,
                                        finish_balance_top1_weight=r.finish_balance_top1_weight) != r:
        raise InvalidInputError(f"{work} holds a run with a different recipe; use another --work-dir")
    recipe_file.write_text(r.to_json())

    tokenizer, tokens = prepare_data(work, r, log)
    model = build_model(r, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, 0.95),
    )
    state = load_checkpoint(work, model, optimizer) or {"step": 0, "tokens_seen": 0, "train_seconds": 0.0}
    log_path = work / "train_log.jsonl"
    if state["step"]:
        log(f"resumed from step {state['step']} ({state['tokens_seen']:,} tokens seen)")
    if log_path.exists():
        # steps after the last checkpoint will be replayed: drop their lines so each step appears once
        at = (state["step"], state.get("finish_step", 0))
        kept = [ln for ln in log_path.read_text().splitlines()
                if ln and (json.loads(ln)["step"], json.loads(ln).get("finish_step", 0)) <= at]
        log_path.write_text("".join(ln + "\n" for ln in kept))
    model.train()
    log_file = log_path.open("a")
    bar = tqdm(total=r.max_steps, initial=state["step"], disable=not progress, unit="step")
    t_last = time.perf_counter()
    window_tokens = 0
    state["finished"] = done(state, r)
    while not state["finished"]:
        step = state["step"]
        finishing = main_done(state, r)  # the final balancing stage: fixed final lr, top-1 balancing
        if finishing:
            lr, coef, top1_weight = r.lr * r.min_lr_ratio, r.finish_balance_coef, r.finish_balance_top1_weight
        else:
            lr, coef, top1_weight = lr_at(step, r, state["train_seconds"]), r.balance_coef, r.balance_top1_weight
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = batch_for_step(tokens, step + state.get("finish_step", 0), r)
        out = model(input_ids=batch[:, :-1], output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        bal = per_layer_balance_loss(out.router_logits, r.num_experts_per_tok, top1_weight)
        loss = ce + coef * bal
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        optimizer.step()
        if finishing:
            state["finish_step"] = state.get("finish_step", 0) + 1
        else:
            state["step"] = step + 1
        state["tokens_seen"] += batch[:, :-1].numel()
        window_tokens += batch[:, :-1].numel()
        now = time.perf_counter()
        state["train_seconds"] += now - t_last
        tps = window_tokens / max(1e-9, now - t_last)
        t_last, window_tokens = now, 0
        state["last_ce"] = float(ce.detach())
        rec = {"step": state["step"], "finish_step": state.get("finish_step", 0), "ce": round(float(ce.detach()), 4), "balance": round(float(bal.detach()), 4),
               "min_top1_share": round(min_top1_share(out.router_logits), 5), "lr": lr,
               "tokens_per_s": round(tps, 1), "tokens_seen": state["tokens_seen"],
               "train_seconds": round(state["train_seconds"], 1)}
        log_file.write(json.dumps(rec) + "\n")
        bar.set_postfix(ce=f"{float(ce.detach()):.3f}", bal=f"{float(bal.detach()):.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        state["finished"] = done(state, r)
        if (state["step"] + state.get("finish_step", 0)) % r.checkpoint_every == 0 or state["finished"]:
            log_file.flush()
            save_checkpoint(work, model, optimizer, state)
        if stop_after is not None and state["step"] + state.get("finish_step", 0) >= stop_after:
            break
    bar.close()
    log_file.close()
    model.eval()
    return model, tokenizer, state
