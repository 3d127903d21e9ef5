"""How much of a forward pass is the router? Time the model as is vs with every router replaced by a
precomputed lookup that returns the same decision at zero cost (so the experts do identical work).

    python -m benchmarks router_share [--model models/reference-moe] [--batch 8 --seq 256 --repeats 15] \
        [--output benchmarks/results/router_share.json]

The two variants run interleaved (rotating order, `var_moe.timing`) in one process; the share is
1 - median(t_lookup) / median(t_router), with the median of per-pair ratios beside it. This bounds
what skipping the router can save: the whole router, nothing else. On a shared machine that
difference of two noisy times is itself noisy, so the routers' own time inside the forward is also
taken from hooks around them (`router_share_hooks`, `var_moe.profiling.forward_cost_shares`, which
also gives the experts', attention's and the output layer's shares). `--tiny` runs on a tiny random
model (smoke test only).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from var_moe.profiling import forward_cost_shares
from var_moe.timing import Variant, interleaved


class ReplayRouter(nn.Module):
    """Returns a stored (router_logits, weights, indices): the routing without computing it."""

    def __init__(self, output: tuple):
        super().__init__()
        self.output = output

    def forward(self, hidden_states):
        return self.output


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from var_moe.adapters import get_adapter

    if a.tiny:
        from var_moe.tiny import tiny_model

        model = tiny_model("mixtral", seed=0)
    else:
        from var_moe.loading import load_model

        model, _ = load_model(a.model) if a.model else load_model()
    adapter = get_adapter(model)
    layers = adapter.moe_layers(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g)
    recorded: dict[int, tuple] = {}
    handles = [m.router.register_forward_hook(lambda mod, i, out, l=m.layer: recorded.__setitem__(l, out)) for m in layers]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    replay = {m.layer: ReplayRouter(recorded[m.layer]) for m in layers}

    def use(kind: str) -> None:
        for m in layers:
            setattr(m.block, m.router_attr, m.router if kind == "router" else replay[m.layer])

    @contextlib.contextmanager
    def using(kind: str):
        use(kind)
        yield

    use("lookup")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref), "replayed routing must reproduce the forward exactly"
    with torch.no_grad():
        timed = interleaved({kind: Variant(lambda i: model(input_ids=ids), around=lambda kind=kind: using(kind))
                             for kind in ("router", "lookup")}, 1, a.repeats, warmup=1)
    times = {kind: [t[0] for t in timed[kind]] for kind in timed}
    use("router")
    # the routers' own time inside the forward, from hooks around them (var_moe.profiling)
    hooks = forward_cost_shares(model, ids, repeats=a.repeats)
    tr, tl = statistics.median(times["router"]), statistics.median(times["lookup"])
    q = lambda xs: [round(v, 5) for v in statistics.quantiles(xs, n=4)]  # noqa: E731
    result = {
        "model": a.model or ("tiny-mixtral" if a.tiny else "reference-moe"),
        "batch": a.batch, "seq": a.seq, "repeats": a.repeats, "threads": a.threads,
        "median_forward_s_with_router": tr, "median_forward_s_with_lookup": tl,
        "router_share_of_forward": 1 - tl / tr,
        "router_share_pairwise_median": statistics.median(1 - l / r for r, l in zip(times["router"], times["lookup"])),
        "max_speedup_from_skipping_router": tr / tl,
        "quartiles_s_with_router": q(times["router"]), "quartiles_s_with_lookup": q(times["lookup"]),
        "router_share_hooks": hooks["shares"]["router"], "forward_cost_shares": hooks["shares"],
        "layers": len(layers), "num_experts": adapter.num_experts, "top_k": adapter.top_k,
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
