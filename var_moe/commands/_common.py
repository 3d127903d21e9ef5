"""Flags shared by several subcommands (model loading, dataset selection), in one place."""

from __future__ import annotations

import argparse

from ..corpus import SPLITS
from ..errors import InvalidInputError
from ..loading import DEVICES, DTYPES, REFERENCE_MODEL_DIR, LoadSpec


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(REFERENCE_MODEL_DIR), help="hub id or local folder (default: the reference model)")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (auto: the checkpoint's)")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs (default cpu)")
    p.add_argument("--quantization", default=None, choices=["4bit", "8bit"], help="bitsandbytes, CUDA only")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own Python (off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_dataset_flags(p: argparse.ArgumentParser, default_split: str = "test") -> None:
    p.add_argument("--dataset", default="stdlib", help="stdlib | local .txt/.jsonl/.parquet path | hub id (c4, wikitext, ...)")
    p.add_argument("--split", default=default_split, choices=SPLITS)
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=None,
                   help="number of sequences (default: the whole split)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int, default=256)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)


def load_spec(args: argparse.Namespace) -> LoadSpec:
    import torch

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise InvalidInputError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    return LoadSpec(path=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                    trust_remote_code=args.trust_remote_code)
