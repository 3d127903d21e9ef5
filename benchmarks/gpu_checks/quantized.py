"""GPU check: bitsandbytes 4-bit / 8-bit loading and `device_map="auto"`, against fp32 on CUDA.

Rows:
- per quantization: it loads through `var_moe.loading.load_model(quantization=...)`, how many
  linear layers bitsandbytes replaced (transformers v5 keeps MoE experts as 3-D parameters, which
  bitsandbytes does not quantize: the count says what was), the memory footprint, and the
  perplexity on the same test batches next to fp32 (the bound catches a broken load, e.g. a
  perplexity near the vocabulary size, not a quality claim);
- `--device auto` (`device_map="auto"`): it loads, and its logits equal fp32 on one GPU.
On the CPU (`--device cpu`, tests only) the rows are skipped: bitsandbytes needs CUDA.
Run: `python -m benchmarks gpu_check --checks quantized`.
"""

from __future__ import annotations

import torch

from . import GPUContext, free_memory, perplexity, row, sample_batches

NAME = "quantized"
MAX_PPL_RATIO = {"8bit": 1.05, "4bit": 1.25}


def _quantized_linears(model) -> int:
    return sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))


def run(ctx: GPUContext) -> list[dict]:
    from var_moe.loading import load_model

    if not ctx.cuda:
        return [row(NAME, f"{q} load + perplexity", None, "CUDA", None, "skipped: bitsandbytes needs CUDA")
                for q in ("4bit", "8bit")] + [row(NAME, "device_map=auto", None, "CUDA", None, "skipped: needs CUDA")]
    rows = []
    ref, tok = load_model(ctx.model, dtype="float32", device="cuda")
    batches = sample_batches(ctx, tok)
    base_ppl = perplexity(ref, batches)
    rows.append(row(NAME, "fp32 perplexity (reference for the rows below)", base_ppl, "finite", base_ppl < float("inf"),
                    f"{ref.get_memory_footprint() / 2**20:.1f} MiB"))
    probe_ids, probe_mask = batches[0]
    with torch.no_grad():
        ref_logits = ref(input_ids=probe_ids.cuda(), attention_mask=probe_mask.cuda()).logits.float().cpu()
    del ref
    free_memory()
    for q in ("4bit", "8bit"):
        try:
            model, _ = load_model(ctx.model, quantization=q, device="cuda")
        except Exception as exc:  # noqa: BLE001 - a failed load is this row's result
            rows.append(row(NAME, f"{q} load", None, "loads", False, f"{type(exc).__name__}: {exc}"[:300]))
            continue
        n_q = _quantized_linears(model)
        rows.append(row(NAME, f"{q} quantized linear layers", n_q, "> 0", n_q > 0,
                        f"{model.get_memory_footprint() / 2**20:.1f} MiB"))
        ppl = perplexity(model, batches)
        rows.append(row(NAME, f"{q} perplexity / fp32", ppl / base_ppl, f"<= {MAX_PPL_RATIO[q]}",
                        ppl / base_ppl <= MAX_PPL_RATIO[q], f"perplexity {ppl:.3f}"))
        del model
        free_memory()
    auto, _ = load_model(ctx.model, dtype="float32", device="auto")
    devices = sorted({str(d) for d in getattr(auto, "hf_device_map", {}).values()})
    first = next(auto.parameters()).device
    with torch.no_grad():
        logits = auto(input_ids=probe_ids.to(first), attention_mask=probe_mask.to(first)).logits.float().cpu()
    keep = probe_mask.bool()
    diff = float((logits - ref_logits)[keep].abs().max())
    rows.append(row(NAME, "device_map=auto: max |logit - fp32 one GPU|", diff, "<= 1e-3", diff <= 1e-3,
                    f"devices {devices}"))
    del auto
    free_memory()
    return rows
