"""`varmoe capture`: stream a corpus split through a model and write per-(layer, token) routing statistics.

    varmoe capture --split test --num-samples 2000 --max-length 256 --output results/stats.parquet \
        [--checkpoint-every 200000 --resume] [--control random-init --seed 0]
    torchrun --nproc_per_node 2 -m var_moe.cli capture --split test --output stats.parquet   # data parallel

The model defaults to the reference model and the dataset to the built-in `stdlib` corpus. The
pair statistics go beside the output as `<stem>.pairs.parquet`. Parses flags, builds a
`CaptureConfig`, calls `var_moe.capture.job.run_capture`. Test: `pytest tests/test_capture_cli.py`.
"""

from __future__ import annotations

import argparse

from ..errors import InvalidInputError
from ._common import add_dataset_flags, add_model_flags, load_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("capture", help="Phase 1: capture routing statistics of a model over a corpus split")
    add_model_flags(p)
    add_dataset_flags(p, default_split="test")
    p.add_argument("--output", "-o", required=True, help="statistics Parquet file to write")
    p.add_argument("--checkpoint-every", "--checkpoint_every", dest="checkpoint_every", type=int, default=None,
                   metavar="TOKENS", help="write a resumable checkpoint every TOKENS valid tokens")
    p.add_argument("--resume", action="store_true", help="continue from the output's checkpoint if there is one")
    p.add_argument("--control", choices=["random-init"], default=None,
                   help="capture the same architecture with seeded random weights (the control)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init control")
    p.add_argument("--pair-capacity", dest="pair_capacity", type=int, default=None,
                   help="keys per layer of the (previous, token) table; 0 turns pair statistics off")
    p.add_argument("--server", default=None, metavar="URL", help=argparse.SUPPRESS)  # moved: see run()
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The one place that turns capture flags into a `CaptureConfig` (single process or torchrun)."""
    from ..capture.job import CaptureConfig
    from ..capture.pairs import DEFAULT_CAPACITY

    return CaptureConfig(
        model=args.model, dataset=args.dataset, split=args.split, num_samples=args.num_samples,
        max_length=args.max_length, batch_size=args.batch_size, checkpoint_every=args.checkpoint_every,
        control=args.control, seed=args.seed, dtype=args.dtype, device=args.device,
        pair_capacity=DEFAULT_CAPACITY if args.pair_capacity is None else args.pair_capacity,
    )


def run(args: argparse.Namespace) -> int:
    from ..capture.distributed import run_distributed, under_torchrun
    from ..capture.job import run_capture

    if args.server:  # the library holds no web code: capture through a server is an analysis job
        raise InvalidInputError(f"--server: capture through a server is `varmoe capture-server --server {args.server} "
                                "--split ... --output ...` (installed with the analysis jobs)")
    spec = load_spec(args)  # validates --dtype/--device/--threads and sets the thread count
    config = config_from_args(args)
    if under_torchrun():  # torchrun --nproc_per_node N -m var_moe.cli capture ...: data parallel
        if spec.quantization or spec.trust_remote_code:
            raise InvalidInputError("--quantization/--trust-remote-code are not supported by the distributed capture")
        run_distributed(config, args.output, resume=args.resume, progress=not args.no_progress)
    model = tokenizer = None
    if spec.quantization or spec.trust_remote_code:
        if config.control:
            raise InvalidInputError("--control random-init cannot be combined with --quantization/--trust-remote-code")
        from ..loading import load_model

        model, tokenizer = load_model(spec)
    run_capture(config, args.output, resume=args.resume, model=model, tokenizer=tokenizer,
                progress=not args.no_progress)
    return 0
