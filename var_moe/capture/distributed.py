"""Data-parallel capture: `torchrun --nproc_per_node N -m var_moe.cli capture <capture flags>`.

Rank r forwards batches r, r+N, r+2N, ... of the same corpus order; at the end every statistic is
all-reduced exactly (integer sums; the moments by the N-way parallel Welford formula, see
`StreamingTokenStats.all_reduce_`), the pair tables are gathered and merged, and rank 0 writes
the files. Backend: nccl when the model is on CUDA, gloo otherwise. Each rank checkpoints its own
state (`<output>.ckpt.rank<r>-of-<N>.safetensors`), so `--resume` works with the same N.

`varmoe capture` calls `run_distributed` when it runs under torchrun (WORLD_SIZE > 1); flags and
the `CaptureConfig` come from that one command.
Test: `pytest tests/test_capture_distributed.py` (2 processes, gloo).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .analyzer import RouterAnalyzer
from .job import CaptureConfig, run_capture
from .pairs import PairStats


def _gather_variable(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    """all_gather for 1-D tensors of different lengths (pad to the longest, then trim)."""
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.cat([t, t.new_zeros(longest - t.numel())])
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(s)] for o, s in zip(out, sizes)]


def all_reduce_pairs(pairs: PairStats) -> None:
    """Every rank ends with the merge of all ranks' pair tables (merged in rank order)."""
    world = dist.get_world_size()
    pairs.flush()
    gathered = []
    for slot in range(len(pairs.layer_ids)):
        gathered.append([_gather_variable(x, world) for x in (pairs.keys[slot], pairs.counts[slot], pairs.deltas[slot])])
    errs = [torch.zeros(len(pairs.layer_ids), dtype=torch.long, device=pairs.device) for _ in range(world)]
    dist.all_gather(errs, torch.tensor(pairs.err, dtype=torch.long, device=pairs.device))
    shards = []
    for r in range(world):
        shard = PairStats(pairs.layer_ids, pairs.vocab_size, pairs.num_experts, pairs.top_k, capacity=pairs.capacity,
                          device=pairs.device)
        for slot in range(len(pairs.layer_ids)):
            keys, counts, deltas = (g[r] for g in gathered[slot])
            shard.keys[slot], shard.counts[slot], shard.deltas[slot] = keys, counts, deltas
        shard.err = [int(e) for e in errs[r]]
        shards.append(shard)
    merged = shards[0]
    for shard in shards[1:]:
        merged.merge(shard)
    pairs.load_state_dict(merged.state_dict())


def reduce_analyzer(analyzer: RouterAnalyzer) -> None:
    analyzer.stats.all_reduce_()
    padding = torch.tensor([analyzer.padding_excluded], dtype=torch.long, device=analyzer.stats.device)
    dist.all_reduce(padding)
    analyzer.padding_excluded = int(padding)
    if analyzer.pairs is not None:
        all_reduce_pairs(analyzer.pairs)


def run_distributed(config: CaptureConfig, output: str | Path, resume: bool = False, progress: bool = True) -> None:
    """This rank's share of the capture; rank 0 writes the files. Leaves the process (see `exit_now`)."""
    if config.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        run_capture(config, output, resume=resume, rank=dist.get_rank(), world_size=dist.get_world_size(),
                    reduce=reduce_analyzer, progress=progress)
        dist.barrier()  # no rank leaves while rank 0 is still writing the files
    finally:
        dist.destroy_process_group()
    exit_now(0)


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_now(code: int) -> None:
    """Leave without interpreter finalization, once every file is written and stdio is flushed.

    Why: a gloo worker thread frees the last collective's work object (and with it a reference
    to a Python-owned tensor) just after `wait()` returns; that free needs the GIL. If it lands
    while the interpreter is finalizing, CPython ends the thread with a forced unwind through a
    noexcept destructor and libstdc++ aborts ("terminate called without an active exception",
    SIGABRT; seen in ~5% of 2-rank runs with torch 2.13, core dump in ProcessGroupGloo::runLoop ->
    ~AsyncAllgatherWork -> take_gil). Skipping finalization removes the race; nothing is lost
    because the process group is destroyed and all output is closed before this point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
