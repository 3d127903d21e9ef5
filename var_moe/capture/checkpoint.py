"""Capture checkpoints: one safetensors file with every statistics tensor and the job position.

The position (batches consumed, tokens, padding rows) and the job's config travel in the
safetensors header metadata, so tensors and position are replaced together by one atomic rename:
a job killed while writing leaves the previous checkpoint intact. No pickle anywhere.

Test: `pytest tests/test_capture_resume.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError

FORMAT = "var_moe.capture.checkpoint/1"


@dataclass(frozen=True)
class Position:
    batches: int  # batches of the corpus consumed (all ranks' batches, in corpus order)
    tokens: int  # valid tokens this process has added
    padding_excluded: int


def checkpoint_path(output: str | Path, rank: int = 0, world_size: int = 1) -> Path:
    out = Path(output)
    suffix = f".rank{rank}-of-{world_size}" if world_size > 1 else ""
    return out.with_name(f"{out.name}.ckpt{suffix}.safetensors")


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], position: Position, config_json: str) -> None:
    from safetensors.torch import save_file

    meta = {
        "format": FORMAT,
        "position": json.dumps(position.__dict__),
        "config": config_json,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], Position, dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidInputError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc
    if meta.get("format") != FORMAT:
        raise InvalidInputError(f"{path} is not a var-moe capture checkpoint")
    return tensors, Position(**json.loads(meta["position"])), json.loads(meta["config"])
