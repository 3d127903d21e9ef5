"""Loading causal MoE models and tokenizers from a local path or hub id, CPU or GPU.

`load_model(path, dtype="auto", device="cpu", quantization=None, trust_remote_code=False)` returns
`(model, tokenizer)` in eval mode. dtype: auto | float32 | bfloat16 | float16; device: cpu | cuda |
auto (`device_map="auto"` across GPUs); quantization: None | 4bit | 8bit (bitsandbytes, CUDA only).
A path that is neither a local folder nor reachable on the hub gets an error naming it.

The default model is the committed reference MoE (`REFERENCE_MODEL_DIR`). Test: `pytest tests/test_loading_corpus.py`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidInputError, VarMoeError

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODEL_DIR = Path(os.environ.get("VARMOE_REFERENCE_MODEL", REPO_ROOT / "models" / "reference-moe"))

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("cpu", "cuda", "auto")
QUANTIZATIONS = (None, "4bit", "8bit")


class ModelLoadError(VarMoeError, RuntimeError):
    """A model could not be loaded; the message says which path/flag and why."""


@dataclass(frozen=True)
class LoadSpec:
    """How to load a model. Validated on construction."""

    path: str = str(REFERENCE_MODEL_DIR)
    dtype: str = "auto"
    device: str = "cpu"
    quantization: str | None = None
    trust_remote_code: bool = False  # off unless the user asks: remote code runs arbitrary Python
    experts_implementation: str | None = None  # eager | grouped_mm | batched_mm; None = library default

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise InvalidInputError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.quantization not in QUANTIZATIONS:
            raise InvalidInputError(f"--quantization must be one of 4bit, 8bit or none, got {self.quantization!r}")


def resolve_device(device: str) -> str:
    """cpu | cuda | auto -> the device to use here ('auto' and no GPU -> cpu; 'cuda' and no GPU -> error)."""
    if device in ("cuda", "auto") and not torch.cuda.is_available():
        if device == "cuda":
            raise ModelLoadError("--device cuda was asked for but no CUDA device is available")
        return "cpu"
    return device


def require_bitsandbytes(quantization: str) -> None:
    """Fail with the install hint when bitsandbytes is absent.

    Importing transformers' `BitsAndBytesConfig` succeeds without bitsandbytes installed, so only
    looking for the package itself tells; otherwise the load fails later inside transformers.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"--quantization {quantization} needs the bitsandbytes package, which is not installed: "
            "pip install 'var-moe[gpu]' (bitsandbytes, accelerate)"
        )


def _hub_hint(path: str) -> str:
    return (
        f"{path!r} is not a local folder and could not be fetched from the Hugging Face hub "
        "(offline, or no such repo). Pass a local folder with config.json and weights, "
        f"or the reference model at {REFERENCE_MODEL_DIR}."
    )


def load_config(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(_hub_hint(str(path))) from exc


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(_hub_hint(str(path))) from exc
    if tok.pad_token is None:
        # Padding is masked out of every statistic; any id works as long as the mask is used.
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: LoadSpec | str | None = None, **overrides: Any) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` per `spec` (a LoadSpec or a path; keyword overrides allowed)."""
    from transformers import AutoModelForCausalLM

    if spec is None or isinstance(spec, (str, os.PathLike)):
        spec = LoadSpec(path=str(spec or REFERENCE_MODEL_DIR), **overrides)
    elif overrides:
        spec = LoadSpec(**{**spec.__dict__, **overrides})
    device = resolve_device(spec.device)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "dtype": DTYPES[spec.dtype]}
    if spec.experts_implementation:
        kwargs["experts_implementation"] = spec.experts_implementation
    if spec.quantization:
        if device == "cpu":
            raise ModelLoadError(
                f"--quantization {spec.quantization} needs a CUDA GPU (bitsandbytes); this process has none. "
                "Drop the flag to load in float32/bfloat16 on the CPU."
            )
        require_bitsandbytes(spec.quantization)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=spec.quantization == "4bit",
            load_in_8bit=spec.quantization == "8bit",
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = "auto"
    elif device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except OSError as exc:
        raise ModelLoadError(_hub_hint(spec.path)) from exc
    if "device_map" not in kwargs:
        model.to(device)
    # result files record the model's name: keep it free of this machine's absolute paths
    model.config._name_or_path = model.name_or_path = portable_path(spec.path)
    model.eval()
    return model, load_tokenizer(spec.path, spec.trust_remote_code)


def portable_path(path: str | os.PathLike) -> str:
    """A path inside this repository as a repo-relative string (what result files record), else unchanged."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except (ValueError, OSError):
        return str(path)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device
