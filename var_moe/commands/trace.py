"""`varmoe trace`: record a per-token, per-layer routing trace for offloading studies (Parquet).

    varmoe trace --split test --num-samples 256 --output results/offload/trace_test.parquet
    varmoe trace --routing-array routed.npy --num-experts 8 [--token-ids ids.npy] \
        [--seq-lengths lens.npy] --output trace.parquet

The first form teacher-forces a corpus split through the model (default: the reference model)
and records the chosen experts, their router probabilities and the speculative next-layer
prediction; the second converts a (tokens, layers, top-k) routing array, the shape vLLM returns
with its routed-experts output on. Parses flags and calls `var_moe.offload.trace`.
Test: `pytest tests/test_offload_cli.py`.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError
from ._common import add_dataset_flags, add_model_flags, load_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record a routing trace (experts per token and layer) for the offloading simulator")
    add_model_flags(p)
    add_dataset_flags(p, default_split="test")
    p.add_argument("--output", "-o", required=True, help="trace Parquet file to write")
    p.add_argument("--routing-array", default=None, help="convert a (tokens, layers, top-k) .npy/.safetensors array instead")
    p.add_argument("--num-experts", type=int, default=None, help="experts per layer (with --routing-array)")
    p.add_argument("--token-ids", default=None, help="token ids (tokens,) for --routing-array")
    p.add_argument("--seq-lengths", default=None, help="sequence lengths for --routing-array (default: one sequence)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..offload.trace import TraceConfig, load_routing_array, record_trace

    if args.routing_array:
        if not args.num_experts or args.num_experts < 1:
            raise InvalidInputError("--routing-array needs --num-experts (experts per layer)")
        trace = load_routing_array(args.routing_array, args.num_experts, args.token_ids, args.seq_lengths)
    else:
        if args.token_ids or args.seq_lengths or args.num_experts:
            raise InvalidInputError("--token-ids, --seq-lengths and --num-experts go with --routing-array")
        from ..loading import load_model

        config = TraceConfig(model=args.model, dataset=args.dataset, split=args.split,
                             num_samples=args.num_samples, max_length=args.max_length, batch_size=args.batch_size)
        model, tokenizer = load_model(load_spec(args))
        trace = record_trace(model, tokenizer, config, progress=not args.no_progress)
    path = trace.write(args.output)
    print(f"wrote {path}: {trace.num_tokens} tokens, {len(set(trace.seq_T.tolist()))} sequences, "
          f"{trace.num_layers} layers, top-{trace.top_k} of {trace.num_experts} experts")
    return 0
