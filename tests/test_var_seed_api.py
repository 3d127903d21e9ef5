"""The seed's Phase 2 API as the README shows it, on the reference model and its committed
calibration statistics: build from statistics, generate, switch at run time, print and save the
performance statistics, restore the original routers.

Run: `pytest tests/test_var_seed_api.py` (seconds, CPU).
"""

from __future__ import annotations

import json

import torch

from var_moe import VARConfig, VARMixtralWrapper, load_model

torch.set_num_threads(1)


def test_readme_workflow(reference_model_dir, tmp_path, capsys):
    model, tok = load_model(str(reference_model_dir))
    originals = [layer.mlp.gate for layer in model.model.layers]
    config = VARConfig.from_routing_stats(reference_model_dir / "var" / "routing_stats_calibration.parquet")
    var_model = VARMixtralWrapper(model, config)
    ids = tok("def main(", return_tensors="pt")
    out = var_model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    stats = var_model.get_performance_stats()
    assert stats["overall"]["calls"] > 0 and stats["overall"]["var_enabled"] is True

    var_model.disable_var()
    assert not var_model.var_enabled
    before = var_model.get_performance_stats()["overall"]["tier_counts"]
    var_model.generate(**ids, max_new_tokens=2, do_sample=False)
    after = var_model.get_performance_stats()["overall"]["tier_counts"]
    assert after["fast"] == before["fast"]  # VAR off: no table decisions
    var_model.enable_var()
    assert var_model.var_enabled

    var_model.print_performance_summary()
    printed = capsys.readouterr().out
    assert "VAR performance summary" in printed and "fast" in printed and "layer 0" in printed

    saved = var_model.save_performance_stats(tmp_path / "perf" / "stats.json")
    assert json.loads(saved.read_text()) == json.loads(json.dumps(var_model.get_performance_stats()))

    var_model.restore()
    assert [layer.mlp.gate for layer in model.model.layers] == originals
