"""The router fingerprint names the stored weights, not the dtype they were loaded in (var_moe.identity).

- the committed reference model (stored in float32) loaded in float32, bfloat16 and float16 gets
  one fingerprint, equal to the committed tables' and to the checkpoint's, read without loading;
- a model whose loaded routers differ from its checkpoint (one weight changed) gets another;
- a tiny model saved in bfloat16 and loaded in float32 keeps the checkpoint's fingerprint, and a
  model with no folder falls back to its own bytes.
"""

from __future__ import annotations

import torch

from var_moe.identity import checkpoint_fingerprint, checkpoint_routers, fingerprint
from var_moe.tiny import tiny_model
from var_moe.var.tables import VARTables, model_identity


def _identity(path, dtype: str):
    from var_moe.adapters import get_adapter
    from var_moe.loading import load_model

    model, _ = load_model(str(path), dtype=dtype)
    return model, model_identity(model, get_adapter(model))


def test_reference_fingerprint_does_not_depend_on_the_loaded_dtype(reference_model_dir):
    from var_moe.adapters import get_adapter

    committed = VARTables.load(reference_model_dir / "var" / "var_tables.safetensors").metadata["router_fingerprint"]
    assert checkpoint_fingerprint(reference_model_dir) == committed
    for dtype in ("float32", "bfloat16", "float16"):
        model, ident = _identity(reference_model_dir, dtype)
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        assert ident["router_fingerprint"] == committed, dtype
        # the bytes in memory differ from the stored ones in 16-bit: the rule is what makes them equal
        own = fingerprint(m.router.state_dict() for m in get_adapter(model).moe_layers(model))
        assert (own == committed) == (dtype == "float32")
    # VARTables.load with the bf16 model accepts the committed tables (fingerprint checked)
    VARTables.load(reference_model_dir / "var" / "var_tables.safetensors", model)


def test_changed_router_weights_are_told_apart(reference_model_dir):
    from var_moe.adapters import get_adapter

    model, ident = _identity(reference_model_dir, "bfloat16")
    router = get_adapter(model).moe_layers(model)[1].router
    with torch.no_grad():
        router.weight[0, 0] += 0.5
    assert model_identity(model, get_adapter(model))["router_fingerprint"] != ident["router_fingerprint"]


def test_checkpoint_in_bf16_loaded_in_fp32(tmp_path):
    from transformers import AutoModelForCausalLM

    from var_moe.adapters import get_adapter

    model = tiny_model("mixtral", seed=3)
    in_memory = model_identity(model, get_adapter(model))["router_fingerprint"]
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    stored = checkpoint_routers(tmp_path)
    assert stored and all(t.dtype == torch.bfloat16 for per in stored.values() for t in per.values())
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    ident = model_identity(loaded, get_adapter(loaded))
    assert ident["router_fingerprint"] == checkpoint_fingerprint(tmp_path)
    assert ident["router_fingerprint"] != in_memory  # the bf16 rounding changed the weights themselves
    assert checkpoint_routers(tmp_path / "missing") is None
