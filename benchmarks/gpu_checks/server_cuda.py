"""GPU check: `varmoe serve --device cuda` answers like the same model in process.

Starts the server (analysis_jobs.server_process.ManagedServer, 127.0.0.1, a free port, fp32) and
compares, on the same device: greedy `/v1/generate` text with in-process `generate()`, and
`/v1/perplexity` with in-process `sequence_nll`; then `var: true` (when the model has VAR
tables) must answer with table/cache decisions. An informational row gives one request's
generated tokens/s. Server log: `<out_dir>/server_cuda.log`.
Run: `python -m benchmarks gpu_check --checks server_cuda`.
"""

from __future__ import annotations

import httpx
import torch

from . import GPUContext, free_memory, row

NAME = "server_cuda"
PROMPT = "def forward(self, x):\n    return self"
TEXTS = ["import os\nimport sys\n", "class A:\n    def f(self):\n        return 1\n"]


def run(ctx: GPUContext) -> list[dict]:
    from analysis_jobs.server_process import ManagedServer
    from var_moe.loading import load_model
    from var_moe.perplexity import sequence_nll

    rows = []
    model, tok = load_model(ctx.model, dtype="float32", device=ctx.device)
    device = next(model.parameters()).device
    ids = tok(PROMPT, return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    nll_sum, count = 0.0, 0
    for text in TEXTS:
        t_ids = tok(text, return_tensors="pt")["input_ids"]
        nll, n = sequence_nll(model, t_ids, torch.ones_like(t_ids))
        nll_sum, count = nll_sum + float(nll[0]), count + int(n[0])
    del model
    free_memory()
    server = ManagedServer(ctx.model, args=["--device", ctx.device, "--dtype", "float32"],
                           log_path=ctx.out_dir / "server_cuda.log")
    try:
        server.wait_ready(300)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            ready = client.get("/readyz").json()
            body = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16, "var": False}).json()
            same = body.get("text") == want
            rows.append(row(NAME, "greedy /v1/generate = in-process generate()", same, "equal", same,
                            f"server {body.get('text')!r}"[:120] if not same else f"{body['generated_tokens']} tokens"))
            t = body.get("timings") or {}
            if t.get("total_s"):
                rows.append(row(NAME, "one request, generated tokens/s", body["generated_tokens"] / t["total_s"],
                                "-", None, "informational: batch 1, includes prefill"))
            ppl = client.post("/v1/perplexity", json={"text": TEXTS, "var": False}).json()["overall"]
            rel = abs(ppl["mean_nll"] - nll_sum / count) / (nll_sum / count)
            rows.append(row(NAME, "/v1/perplexity mean NLL, relative diff to in process", rel, "<= 1e-4", rel <= 1e-4,
                            f"{ppl['tokens']} tokens"))
            if ready.get("var_available"):
                v = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 8, "var": True}).json()
                served = (v.get("routing") or {}).get("fast", 0)
                rows.append(row(NAME, "var: true, table/cache decisions", served, "> 0",
                                v.get("mode") == "var" and served > 0, ""))
            else:
                rows.append(row(NAME, "var: true", None, "VAR tables", None, "skipped: the model has no VAR tables"))
    finally:
        code = server.stop()
    rows.append(row(NAME, "server exit status after SIGTERM", code, "0 or -15", code in (0, -15), ""))
    return rows
