"""GPU check: routing in bf16 vs fp32 on CUDA, fp32 CUDA vs fp32 CPU, and the Phase 1 capture in bf16.

Routing is read with `RoutingRecorder` (the routers' own top-k, padding masked) on the same
test-split batches for every model. Rows:
- per layer, the share of tokens whose exact top-k expert set is the same in bf16 and fp32 on
  CUDA (the style guide expects bf16 to flip a few % of tokens: router math belongs in fp32);
- the same share for fp32 on CUDA vs fp32 on the CPU (kernels differ; expected ~1);
- `varmoe capture` in bf16 on CUDA: it runs, and counts the same tokens as the fp32 capture.
Run: `python -m benchmarks gpu_check --checks bf16_routing`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import GPUContext, free_memory, row, sample_batches

NAME = "bf16_routing"
MIN_BF16_AGREEMENT = 0.90  # a sanity bound: far below it means bf16 routing is broken, not merely noisy
MIN_DEVICE_AGREEMENT = 0.99


def topk_sets(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """layer -> sorted top-k expert ids of every real token, `(T, K)` on the CPU, batches concatenated."""
    from var_moe.capture.recorder import RoutingRecorder

    out: dict[int, list[torch.Tensor]] = {}

    def keep(layer, tokens, decision):
        out.setdefault(layer, []).append(decision.topk_idx_TK[tokens.valid_T].sort(-1).values.cpu())

    device = next(model.parameters()).device
    with torch.no_grad(), RoutingRecorder(model, callback=keep):
        for ids, mask in batches:
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return {layer: torch.cat(parts) for layer, parts in out.items()}


def agreement(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per layer, the share of tokens with the same top-k set in `a` and `b`."""
    if a.keys() != b.keys() or any(a[l].shape != b[l].shape for l in a):
        raise RuntimeError("the two runs routed different token counts; they did not see the same batches")
    return {l: float((a[l] == b[l]).all(-1).float().mean()) for l in sorted(a)}


def run(ctx: GPUContext) -> list[dict]:
    from var_moe.capture.job import CaptureConfig, run_capture
    from var_moe.loading import load_model

    rows = []
    ref, tok = load_model(ctx.model, dtype="float32", device=ctx.device)
    batches = sample_batches(ctx, tok)
    fp32 = topk_sets(ref, batches)
    del ref
    free_memory()
    half, _ = load_model(ctx.model, dtype="bfloat16", device=ctx.device)
    bf16 = topk_sets(half, batches)
    del half
    free_memory()
    tokens = int(next(iter(fp32.values())).shape[0])
    for layer, share in agreement(fp32, bf16).items():
        rows.append(row(NAME, f"bf16 = fp32 top-k set, layer {layer}", share, f">= {MIN_BF16_AGREEMENT}",
                        share >= MIN_BF16_AGREEMENT, f"{tokens} tokens, {ctx.device}"))
    if ctx.cuda:
        cpu_model, _ = load_model(ctx.model, dtype="float32", device="cpu")
        on_cpu = topk_sets(cpu_model, batches)
        del cpu_model
        worst = min(agreement(fp32, on_cpu).values())
        rows.append(row(NAME, "fp32 CUDA = fp32 CPU top-k set, worst layer", worst, f">= {MIN_DEVICE_AGREEMENT}",
                        worst >= MIN_DEVICE_AGREEMENT, f"{tokens} tokens"))
    counts = {}
    for dtype in ("bfloat16", "float32"):
        cfg = CaptureConfig(model=ctx.model, split="test", num_samples=ctx.num_samples, max_length=ctx.max_length,
                            dtype=dtype, device=ctx.device)
        result = run_capture(cfg, ctx.out_dir / f"capture_{dtype}.parquet", progress=False, log=lambda *_: None)
        counts[dtype] = result.tokens
        del result
        free_memory()
    rows.append(row(NAME, "capture bf16: tokens (= fp32 capture)", counts["bfloat16"], f"= {counts['float32']}",
                    counts["bfloat16"] == counts["float32"] > 0, f"file {ctx.out_dir.name}/capture_bfloat16.parquet"))
    return rows
