"""Which router weights a VAR artifact belongs to: the fingerprint of the routers as stored.

Tables and evidence carry `router_fingerprint`, a SHA-256 (first 16 hex) over each MoE layer's
router parameters in float32, layer by layer, names sorted within a router. Computed from the
weights a model holds in memory it depends on the dtype they were loaded in: the same float32
checkpoint served in bfloat16 (vLLM's CPU build on a CPU with bf16 support; vLLM on GPUs by
default) has other bytes. So the fingerprint is taken from the **stored checkpoint** whenever the
routers in memory are that checkpoint's routers in the loaded dtype (each checked exactly: the
stored tensor cast to the loaded dtype equals the loaded tensor): the same weights in float32,
bfloat16 or float16 get one fingerprint, and other weights (fine-tuned, perturbed, another
checkpoint) are still told apart, because their loaded routers do not match the stored ones and
the fingerprint falls back to their own bytes. For a float32 checkpoint both ways give the same
value, so tables built before this rule keep their fingerprint.

`checkpoint_routers(model_dir)` reads only the router tensors of a local safetensors checkpoint
(names found by the family adapter on a meta-device copy of the model, no weights loaded), so a
server can compare a tables file with the weights in a second, before an engine loads anything.

Test: `pytest tests/test_identity.py`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

# per MoE layer (decoder index, ascending): the router's own parameter names -> tensor
RouterTensors = dict[int, dict[str, torch.Tensor]]


def fingerprint(routers: Iterable[Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 (first 16 hex) of router parameters in float32, routers in order, names sorted."""
    h = hashlib.sha256()
    for params in routers:
        for name, t in sorted(params.items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _safetensors_files(model_dir: Path) -> dict[str, Path] | None:
    """tensor name -> file, from a sharded index or the single model.safetensors; None without either."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        return {name: model_dir / f for name, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def router_names(model_dir: str | Path) -> dict[int, dict[str, str]] | None:
    """{MoE layer: {router parameter name: full checkpoint name}}, found by the family adapter on a
    meta-device model built from the folder's config (no weights read); None when the folder has no
    config or the family is not supported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import get_adapter
    from .errors import InvalidInputError

    if not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        config = AutoConfig.from_pretrained(str(model_dir))  # trust_remote_code stays off
        adapter = get_adapter(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layers = adapter.moe_layers(model)
    except (InvalidInputError, ValueError, KeyError, OSError):
        return None
    prefix_of = {id(m): name for name, m in model.named_modules()}
    names: dict[int, dict[str, str]] = {}
    for m in layers:
        prefix = prefix_of[id(m.router)]
        names[m.layer] = {local: f"{prefix}.{local}" for local in m.router.state_dict()}
    return names


def _stored_names(model_type: str | None) -> list[tuple[str, str]]:
    """(name in the model, name in the checkpoint) substring pairs of the plain renamings transformers
    applies when it loads `model_type` (transformers v5 saves in the checkpoint's own naming, e.g.
    Mixtral's `.block_sparse_moe.` for the module path `.mlp.`); [] where this transformers has none."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        found = []
        for t in get_checkpoint_conversion_mapping(model_type) or []:
            src, tgt = list(getattr(t, "source_patterns", [])), list(getattr(t, "target_patterns", []))
            if type(t) is WeightRenaming and len(src) == 1 and len(tgt) == 1:
                found.append((tgt[0], src[0]))
        return found
    except (ImportError, AttributeError, TypeError):
        return []


def _find(full: str, files: Mapping[str, Path], renamings: list[tuple[str, str]]) -> str | None:
    if full in files:
        return full
    for in_model, stored in renamings:
        candidate = full.replace(in_model, stored, 1) if in_model in full else None
        if candidate in files:
            return candidate
    return None


def checkpoint_routers(model_dir: str | Path) -> RouterTensors | None:
    """The routers' tensors as stored in a local safetensors checkpoint, read without loading the
    rest; None when they cannot be found (not a local folder, no safetensors, or names that neither
    match the modules' nor follow one of transformers' plain renamings for the family)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    files = _safetensors_files(model_dir)
    names = router_names(model_dir) if files else None
    if not names:
        return None
    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    renamings = _stored_names(model_type)
    stored_name = {full: _find(full, files, renamings) for per in names.values() for full in per.values()}
    if any(v is None for v in stored_name.values()):
        return None
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for key in stored_name.values():
        by_file.setdefault(files[key], []).append(key)
    got: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            got.update({k: f.get_tensor(k) for k in keys})
    return {layer: {local: got[stored_name[full]] for local, full in per.items()} for layer, per in sorted(names.items())}


def checkpoint_fingerprint(model_dir: str | Path) -> str | None:
    """The fingerprint of a local checkpoint's stored routers (None: see checkpoint_routers)."""
    stored = checkpoint_routers(model_dir)
    return fingerprint(stored[l] for l in sorted(stored)) if stored else None


def matches_checkpoint(loaded: RouterTensors, stored: RouterTensors | None) -> bool:
    """True when every loaded router tensor is the stored one cast to the loaded dtype, exactly."""
    if not stored or sorted(loaded) != sorted(stored):
        return False
    for layer, params in loaded.items():
        if sorted(params) != sorted(stored[layer]):
            return False
        for name, t in params.items():
            s = stored[layer][name]
            if s.shape != t.shape or not torch.equal(s.to(t.dtype), t.detach().to("cpu")):
                return False
    return True


def routers_fingerprint(loaded: RouterTensors, model_dir: str | Path | None) -> str:
    """The fingerprint of the routers a model holds: the stored checkpoint's when they are its routers
    in the loaded dtype (so the value does not depend on that dtype), else their own bytes'."""
    stored = checkpoint_routers(model_dir) if model_dir else None
    source = stored if matches_checkpoint(loaded, stored) else loaded
    return fingerprint(source[l] for l in sorted(source))


def model_dir_of(model: Any) -> str | None:
    """The local folder a transformers model was loaded from, if any."""
    path = str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")
    return path if path and Path(path).is_dir() else None

