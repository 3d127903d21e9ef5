"""The capture job: corpus -> RouterAnalyzer -> statistics Parquet (+ pair sidecar), resumable.

`run_capture(CaptureConfig(...), output)` loads the model (or builds the seeded random-init
control of the same architecture), streams padded batches of the chosen split through it,
checkpoints every `checkpoint_every` tokens (safetensors, see `checkpoint.py`) and writes the
files. `resume=True` restores the last checkpoint and skips the batches it had consumed, so the
result is bit-identical to an uninterrupted run (same batches, same order, same float64 state).
Data-parallel: with `world_size` N, rank r takes batches r, r+N, ...; `reduce` (see
`distributed.py`) combines the ranks before rank 0 writes.

CLI: `varmoe capture --help`. Test: `pytest tests/test_capture_resume.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..corpus import SPLITS, iter_batches
from ..errors import InvalidInputError
from .analyzer import RouterAnalyzer
from .checkpoint import Position, checkpoint_path, load_checkpoint, save_checkpoint
from .pairs import DEFAULT_CAPACITY

CONTROLS = (None, "random-init")


class CaptureInterrupted(RuntimeError):
    """Raised by the `stop_after_batches` test hook, standing in for a killed job."""


@dataclass(frozen=True)
class CaptureConfig:
    model: str  # local folder or hub id (default in the CLI: the reference model)
    dataset: str = "stdlib"  # stdlib | local path | hub id
    split: str = "test"  # train | calibration | test
    num_samples: int | None = None  # sequences; None = the whole split
    max_length: int = 256  # tokens per sequence
    batch_size: int = 8
    checkpoint_every: int | None = None  # tokens between checkpoints; None = no checkpoints
    control: str | None = None  # None | "random-init": same architecture, seeded random weights
    seed: int = 0  # seed of the random-init control
    dtype: str = "auto"
    device: str = "cpu"
    pair_capacity: int = DEFAULT_CAPACITY  # pair-table keys per layer (0 = no pair statistics)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InvalidInputError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.num_samples is not None and self.num_samples < 1:
            raise InvalidInputError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_length < 2:
            raise InvalidInputError(f"--max-length must be >= 2, got {self.max_length}")
        if self.batch_size < 1:
            raise InvalidInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise InvalidInputError(f"--checkpoint-every must be >= 1 token, got {self.checkpoint_every}")
        if self.control not in CONTROLS:
            raise InvalidInputError(f"--control must be 'random-init' or absent, got {self.control!r}")
        if self.pair_capacity < 0 or self.pair_capacity == 1:
            raise InvalidInputError(f"--pair-capacity must be 0 (off) or >= 2, got {self.pair_capacity}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CaptureConfig":
        data = json.loads(text)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown capture config fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class CaptureResult:
    analyzer: RouterAnalyzer
    output: Path | None
    tokens: int
    seconds: float


def load_for_capture(config: CaptureConfig) -> tuple[Any, Any]:
    """(model, tokenizer): the trained model, or its seeded random-init control."""
    from ..loading import LoadSpec, load_config, load_model, load_tokenizer

    if config.control is None:
        return load_model(LoadSpec(path=config.model, dtype=config.dtype, device=config.device))
    from transformers import AutoModelForCausalLM

    from ..loading import DTYPES, resolve_device

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(load_config(config.model))
    dtype = DTYPES[config.dtype]
    if dtype != "auto":
        model.to(dtype)
    model.to(resolve_device(config.device)).eval()
    return model, load_tokenizer(config.model)


def _state(analyzer: RouterAnalyzer) -> dict[str, torch.Tensor]:
    state = {f"stats.{k}": v for k, v in analyzer.stats.state_dict().items()}
    if analyzer.pairs is not None:
        state.update(analyzer.pairs.state_dict())
    return state


def _restore(analyzer: RouterAnalyzer, tensors: dict[str, torch.Tensor]) -> None:
    analyzer.stats.load_state_dict({k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")})
    if analyzer.pairs is not None:
        analyzer.pairs.load_state_dict({k: v for k, v in tensors.items() if k.startswith("pairs.")})


def run_capture(
    config: CaptureConfig,
    output: str | Path | None,
    resume: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[RouterAnalyzer], None] | None = None,
    progress: bool = True,
    stop_after_batches: int | None = None,
    log: Callable[[str], None] = print,
) -> CaptureResult:
    """Run (or resume) a capture; rank 0 writes `output` (and its `.pairs.parquet` sidecar)."""
    if model is None:
        model, tokenizer = load_for_capture(config)
    if tokenizer is None:
        raise InvalidInputError("a tokenizer is needed to read the corpus")
    analyzer = RouterAnalyzer(model, tokenizer=tokenizer, track_pairs=config.pair_capacity > 0,
                              pair_capacity=max(config.pair_capacity, 2))
    ckpt = checkpoint_path(output, rank, world_size) if output is not None else None
    position = Position(0, 0, 0)
    if resume and ckpt is not None and ckpt.exists():
        tensors, position, saved = load_checkpoint(ckpt)
        if saved != json.loads(config.to_json()):
            raise InvalidInputError(f"--resume: checkpoint {ckpt} was written by another configuration: {saved}")
        _restore(analyzer, tensors)
        analyzer.padding_excluded = position.padding_excluded
        log(f"resuming from {ckpt}: {position.batches} batches, {position.tokens} tokens done")
    elif resume:
        log(f"--resume: no checkpoint at {ckpt}; starting from the beginning")

    from tqdm import tqdm

    bar = tqdm(total=None, unit="tok", unit_scale=True, disable=not progress or rank != 0, desc="capture")
    tokens, batches, since_ckpt, done_here = position.tokens, position.batches, 0, 0
    start = time.perf_counter()
    batch_iter = iter_batches(tokenizer, config.dataset, config.split, config.max_length, config.batch_size,
                              config.num_samples)
    for i, (ids, mask) in enumerate(batch_iter):
        if i < position.batches:
            continue  # consumed before the checkpoint (tokenized again, not forwarded)
        batches = i + 1
        if i % world_size != rank:
            continue
        analyzer.analyze_batch(ids, mask)
        n = int(mask.sum())
        tokens += n
        since_ckpt += n
        done_here += 1
        bar.update(n)
        if ckpt is not None and config.checkpoint_every and since_ckpt >= config.checkpoint_every:
            save_checkpoint(ckpt, _state(analyzer), Position(batches, tokens, analyzer.padding_excluded), config.to_json())
            since_ckpt = 0
        if stop_after_batches is not None and done_here >= stop_after_batches:
            raise CaptureInterrupted(f"stopped after {done_here} batches (test hook)")
    bar.close()
    seconds = time.perf_counter() - start
    if world_size > 1:
        log(f"rank {rank} of {world_size}: forwarded {done_here} batches, {tokens - position.tokens} tokens")
    if reduce is not None:
        reduce(analyzer)
    if output is not None and rank == 0:
        meta = {
            "dataset": config.dataset,
            "split": config.split,
            "control": config.control or "none",
            "config": json.loads(config.to_json()),
            "batches": batches,
        }
        if config.control:
            meta["model"] = f"{config.model} (random-init control, seed {config.seed})"
        analyzer.write_parquet(output, meta)
        log(f"wrote {output} ({analyzer.stats.num_tokens} tokens, {seconds:.1f}s, "
            f"{tokens / max(seconds, 1e-9):.0f} tokens/s on this process)")
    if ckpt is not None and ckpt.exists() and (rank != 0 or Path(output).exists()):
        ckpt.unlink()  # the finished file supersedes the checkpoint
    return CaptureResult(analyzer, Path(output) if output is not None else None, tokens, seconds)
