"""`varmoe ab-test`: the Phase 2 A/B job from the command line (flags -> ABConfig -> run -> report).

    varmoe ab-test --duration 120 --users 8 --output-dir results/ab_test
    varmoe ab-test --url http://127.0.0.1:8000 --duration 60      # a server you started yourself

Without --url it starts `varmoe serve` (the reference model and its VAR tables by default, or
--model) on a free 127.0.0.1 port with a fresh admin token, and stops it afterwards. Exit code 0
when the job ran (an honest FAIL of a criterion is a valid outcome), 2 on bad flags.
Test: `pytest tests/test_ab_job.py`.
"""

from __future__ import annotations

import argparse
import shlex

from var_moe.errors import InvalidInputError


def register(subparsers) -> None:
    p = subparsers.add_parser("ab-test", help="A/B test VAR on vs off under Locust load through the server",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="target server (default: start one on a free 127.0.0.1 port)")
    p.add_argument("--model", default=None, help="model folder for the started server (default: the reference model)")
    p.add_argument("--server-args", default="", help="extra `varmoe serve` flags, e.g. \"--max-batch-size 8\"")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--spawn-rate", type=float, default=4.0)
    p.add_argument("--output-dir", default="results/ab_test")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between /metrics samples (= CI window)")
    p.add_argument("--dataset", default="stdlib", help="prompts and perplexity texts come from its test split")
    p.add_argument("--ppl-texts", type=int, default=32)
    p.add_argument("--ppl-chars", type=int, default=1500)
    p.add_argument("--max-new", default="16,48", help="max_new_tokens of short,long generations")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from .ab_test import ABConfig

    try:
        max_new = tuple(int(x) for x in args.max_new.split(","))
    except ValueError:
        raise InvalidInputError(f"--max-new must be two integers like 16,48, got {args.max_new!r}") from None
    if len(max_new) != 2 or min(max_new) < 1:
        raise InvalidInputError("--max-new must be two positive integers, e.g. 16,48")
    if args.url is not None and not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        raise InvalidInputError(f"--url {args.url!r}: only loopback servers are targeted by this job")
    return ABConfig(url=args.url, model=args.model, server_args=tuple(shlex.split(args.server_args)),
                    duration_s=args.duration, users=args.users, spawn_rate=args.spawn_rate,
                    output_dir=args.output_dir, sample_every_s=args.sample_every, dataset=args.dataset,
                    ppl_texts=args.ppl_texts, ppl_chars=args.ppl_chars, max_new=max_new, n_boot=args.n_boot,
                    seed=args.seed, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from .ab_report import write_report
    from .ab_test import run_ab_test

    cfg = config_from_args(args)
    results = run_ab_test(cfg)
    paths = write_report(results, cfg.output_dir)
    for c in results["criteria"]:
        value = "n/a" if c["value"] is None else f"{c['value']:.4f}"
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['name']}: {value}  ({c['rule']})")
    print(f"report: {paths['markdown']}")
    return 0
