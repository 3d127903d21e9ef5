"""Hub models as local folders: `varmoe download-model`'s library side (the seed's download_models.py).

`download_model(repo_id, output, revision=None, quantization=None)` copies a hub snapshot into
`output` (config, tokenizer files and *.safetensors weights only: pickled *.bin / *.pt weights are
never fetched, so a repo without safetensors is refused with a message), checks that the folder
holds a supported MoE architecture, and, with `quantization` 4bit | 8bit, loads it through
bitsandbytes on CUDA and saves the quantized model beside it (`<output>-4bit`). Every later
command then takes `--model <output>` and runs offline.

Errors name the model and say why: offline (`HF_HUB_OFFLINE=1` or no network: "copy the folder
from a machine that has access"), no such repo or revision, a gated repo without a token,
quantization without CUDA or bitsandbytes (checked before anything is downloaded).
Test: `pytest tests/test_hub_datasets.py` (offline; the hub is replaced by a local folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInputError, VarMoeError

# What a model folder needs, and nothing that unpickles: safetensors weights, JSON configs,
# tokenizer files (json/model/txt/tiktoken), the model card.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.md"]


class DownloadError(VarMoeError, RuntimeError):
    """A model could not be downloaded; the message names it and says why."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    family: str | None  # adapter family, None when the architecture is not a supported MoE
    weight_files: int
    quantized_path: Path | None = None


def _offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _explain(repo_id: str, revision: str | None, exc: Exception) -> str:
    """A sentence on why `repo_id` could not be fetched, from the hub library's exception."""
    from huggingface_hub import errors

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    if isinstance(exc, errors.GatedRepoError):
        return f"{where} is gated: accept its terms on the hub and log in (`hf auth login`) or set HF_TOKEN"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{where}: no such model repository on the hub (or it is private: set HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{where}: no such revision"
    if _offline():
        return (f"cannot download {where}: offline mode is on (HF_HUB_OFFLINE=1) and it is not in the local "
                "cache. Unset HF_HUB_OFFLINE on a machine with access, or copy the model folder from one "
                "and pass --model FOLDER")
    return (f"cannot download {where}: the hub is unreachable from here ({type(exc).__name__}). Run this on a "
            "machine with access and copy the folder over, then pass --model FOLDER")


def check_quantization(quantization: str | None) -> None:
    """Quantization needs CUDA and bitsandbytes: say so before a large download, not after."""
    if quantization is None:
        return
    if quantization not in ("4bit", "8bit"):
        raise InvalidInputError(f"--quantization must be 4bit or 8bit, got {quantization!r}")
    import torch

    from .loading import require_bitsandbytes

    if not torch.cuda.is_available():
        raise DownloadError(f"--quantization {quantization} needs a CUDA GPU (bitsandbytes); this machine has none. "
                            "Download without it; load with --quantization on the GPU machine")
    require_bitsandbytes(quantization)


def snapshot(repo_id: str, output: Path, revision: str | None = None) -> Path:
    """The hub snapshot of `repo_id` (safetensors + configs + tokenizer) in `output`."""
    from huggingface_hub import errors, snapshot_download

    hub_errors = (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled,
                  errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError,
                  ConnectionError, TimeoutError, OSError)
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=str(output), allow_patterns=ALLOW_PATTERNS)
    except hub_errors as exc:
        raise DownloadError(_explain(repo_id, revision, exc)) from exc
    return Path(path)


def describe_folder(path: Path) -> tuple[str | None, int]:
    """(adapter family or None, number of safetensors weight files) of a downloaded folder."""
    from .adapters import UnsupportedModelError, get_adapter
    from .loading import load_config

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise DownloadError(f"{path}: the repository has no *.safetensors weights (pickled .bin/.pt weights are "
                            "not downloaded: they can run code when loaded)")
    try:
        family = get_adapter(load_config(path)).family
    except UnsupportedModelError:
        family = None
    return family, len(weights)


def quantize_folder(path: Path, quantization: str, output: Path | None = None) -> Path:
    """Load `path` with bitsandbytes `quantization` on CUDA and save it to `output` (`<path>-4bit`)."""
    from .loading import load_model

    check_quantization(quantization)
    out = output or path.with_name(f"{path.name}-{quantization}")
    model, tok = load_model(str(path), quantization=quantization, device="cuda")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def download_model(repo_id: str, output: str | Path, revision: str | None = None,
                   quantization: str | None = None) -> DownloadResult:
    """Fetch `repo_id` into `output`; optionally save a bitsandbytes-quantized copy beside it."""
    if not repo_id or repo_id.startswith(("/", ".")) or Path(repo_id).exists():
        raise InvalidInputError(f"MODEL {repo_id!r} is a local path, not a hub id (org/name): nothing to download")
    check_quantization(quantization)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise InvalidInputError(f"--output {out} exists and is not a model folder; choose an empty or new folder")
    path = snapshot(repo_id, out, revision)
    family, n_weights = describe_folder(path)
    quantized = quantize_folder(path, quantization) if quantization else None
    return DownloadResult(path, family, n_weights, quantized)

