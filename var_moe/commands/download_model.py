"""`varmoe download-model ORG/NAME --output DIR [--revision R] [--quantization 4bit|8bit]`.

The seed's `scripts/download_models.py`: a hub snapshot (safetensors, configs, tokenizer; never
pickled weights) into a local folder that every command then takes as `--model DIR`, offline.
`--quantization` also saves a bitsandbytes-quantized copy as `DIR-4bit` / `DIR-8bit` (CUDA only,
checked before downloading). Offline (`HF_HUB_OFFLINE=1`, or no network) it exits 2 with a message
naming the model. Parses flags and calls `var_moe.hub`. Test: `pytest tests/test_hub_datasets.py`.
"""

from __future__ import annotations

import argparse

DESCRIPTION = ("Copy a hub snapshot (safetensors weights, configs, tokenizer; never pickled weights) into a "
               "local folder that every command then takes as --model FOLDER, offline. --quantization also "
               "saves a bitsandbytes-quantized copy as FOLDER-4bit / FOLDER-8bit (needs CUDA, checked before "
               "downloading). Offline (HF_HUB_OFFLINE=1, or no network) it exits 2 naming the model.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download-model", help="download a hub model into a local folder (optionally quantized)",
                       description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="hub id, e.g. mistralai/Mixtral-8x7B-v0.1")
    p.add_argument("--output", "-o", required=True, help="folder to write (created; later: --model FOLDER)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--quantization", default=None, choices=["4bit", "8bit"],
                   help="also save a bitsandbytes-quantized copy beside it (CUDA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import download_model

    result = download_model(args.model, args.output, args.revision, args.quantization)
    kind = f"a supported MoE ({result.family})" if result.family else "not a supported MoE architecture (routing commands will refuse it)"
    print(f"downloaded {args.model} -> {result.path}: {result.weight_files} safetensors file(s), {kind}")
    if result.quantized_path:
        print(f"{args.quantization} copy -> {result.quantized_path}")
    print(f"use it with: --model {result.path}")
    return 0
