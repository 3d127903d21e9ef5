"""Verified tables: Wilson bound vs scipy, admission rule vs a brute-force filter, weights, file
round-trip and refusal of files made for another model. Run: `pytest tests/test_var_tables.py`."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.brute_stats import brute_force_stats
from var_moe.var.config import VARConfig
from var_moe.var.tables import VARTables, wilson_lower_bound

torch.set_num_threads(1)


def test_wilson_matches_scipy():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 500, size=200)
    x = rng.integers(0, n + 1)
    ours = wilson_lower_bound(torch.as_tensor(x), torch.as_tensor(n), 1.959963984540054).numpy()
    ref = np.array([sps.binomtest(int(a), int(b)).proportion_ci(0.95, method="wilson").low for a, b in zip(x, n)])
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert float(wilson_lower_bound(torch.tensor([0]), torch.tensor([0]), 1.96)) == 0.0


def synthetic_stats(vocab=99, e=4, k=2, layers=(0, 1), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for layer in layers:
        toks = rng.choice(vocab, size=60, replace=False)
        for t in toks:  # building a test fixture row by row is fine
            freq = int(rng.integers(1, 300))
            modal = np.sort(rng.choice(e, size=k, replace=False)).astype(np.int32)
            counts = np.zeros(e, dtype=np.int64)
            counts[modal] = freq
            wsums = np.zeros(e)
            wsums[modal] = freq * rng.dirichlet(np.ones(k))
            rows.append(dict(layer=layer, token_id=int(t), frequency=freq, mean_entropy=float(rng.uniform(0, 1.4)),
                             modal_topk_set=modal, modal_set_count=int(rng.integers(0, freq + 1)),
                             topk_counts=counts, topk_weight_sums=wsums))
    meta = dict(model_type="mixtral", vocab_size=vocab, num_experts=e, top_k=k, split="calibration")
    return pd.DataFrame(rows), meta


def test_admission_rule_matches_brute_force():
    model = tiny_model("mixtral", seed=0)
    adapter = get_adapter(model)
    df, meta = synthetic_stats()
    cfg = VARConfig(frequency_threshold=30, entropy_threshold=0.8, entropy_relative=False, target_agreement=0.7)
    tables = VARTables.from_stats(df, meta, model, adapter, cfg)
    for layer in (0, 1):
        sub = df[df.layer == layer]
        expect = set()
        for r in sub.itertuples():  # brute force: scipy Wilson per row
            low = sps.binomtest(r.modal_set_count, r.frequency).proportion_ci(0.95, method="wilson").low
            if r.frequency >= 30 and r.mean_entropy <= 0.8 and low >= 0.7 - 1e-12:
                expect.add(r.token_id)
        got = set(torch.nonzero(tables[layer].member_V).squeeze(1).tolist())
        assert got == expect and len(expect) > 0
        for r in sub.itertuples():
            t = tables[layer]
            assert set(t.experts_VK[r.token_id].tolist()) == set(r.modal_topk_set.tolist())
            w = r.topk_weight_sums[r.modal_topk_set] / r.topk_counts[r.modal_topk_set]
            want = dict(zip(r.modal_topk_set.tolist(), (w / w.sum()).tolist()))
            got_w = dict(zip(t.experts_VK[r.token_id].tolist(), t.weights_VK[r.token_id].tolist()))
            assert all(abs(got_w[x] - want[x]) < 1e-6 for x in want)
            assert t.weights_VK[r.token_id, 0] >= t.weights_VK[r.token_id, 1]  # top expert first


def test_stats_from_another_vocabulary_refused():
    model = tiny_model("mixtral", seed=0)
    df, meta = synthetic_stats()
    meta["vocab_size"] = 4096
    with pytest.raises(ValueError, match="vocab_size"):
        VARTables.from_stats(df, meta, model, get_adapter(model), VARConfig())


def test_save_load_and_refusal(tmp_path):
    model = tiny_model("mixtral", seed=0)
    adapter = get_adapter(model)
    df, meta = synthetic_stats()
    cfg = VARConfig(frequency_threshold=10, entropy_threshold=1.5, entropy_relative=False, target_agreement=0.3)
    tables = VARTables.from_stats(df, meta, model, adapter, cfg)
    path = tables.save(tmp_path / "t.safetensors")
    assert (tmp_path / "t.json").exists()
    back = VARTables.load(path, model)
    for l in (0, 1):
        for name in ("experts_VK", "weights_VK", "member_V", "bound_V"):
            assert torch.equal(getattr(back[l], name), getattr(tables[l], name))
    with pytest.raises(ValueError, match="router_fingerprint"):
        VARTables.load(path, tiny_model("mixtral", seed=5))  # same shapes, other weights
    with pytest.raises(ValueError, match="model_type"):
        VARTables.load(path, tiny_model("olmoe", seed=0))
    with pytest.raises(ValueError, match="num_experts"):
        VARTables.load(path, tiny_model("mixtral", seed=0, num_local_experts=8), check_fingerprint=False)
    with pytest.raises(FileNotFoundError):
        VARTables.load(tmp_path / "missing.safetensors")


def test_tables_from_real_capture_route_like_the_router():
    """On a tiny model, tokens admitted at target 0.9 agree with the learned router on their
    calibration occurrences at least as often as the bound says."""
    model = tiny_model("mixtral", seed=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, 20, (4, 32), generator=g), torch.ones(4, 32, dtype=torch.long)) for _ in range(4)]
    df, meta = brute_force_stats(model, batches)
    tables = VARTables.from_stats(df, meta, model, get_adapter(model),
                                  VARConfig(frequency_threshold=5, entropy_threshold=5.0, entropy_relative=False, target_agreement=0.5))
    sub = df[df.layer == 0].set_index("token_id")
    members = torch.nonzero(tables[0].member_V).squeeze(1).tolist()
    assert members
    for t in members:
        assert sub.loc[t, "modal_set_count"] / sub.loc[t, "frequency"] >= float(tables[0].bound_V[t])


def test_committed_reference_tables_fit_the_committed_model(reference_model_dir):
    """The server loads models/reference-moe/var/var_tables.safetensors by default: it must match the
    committed model (a retrained model changes the router fingerprint and is refused)."""
    from var_moe.loading import load_model

    path = reference_model_dir / "var" / "var_tables.safetensors"
    if not path.exists():
        pytest.skip("no committed VAR tables next to the reference model")
    model, _ = load_model(reference_model_dir)
    tables = VARTables.load(path, model)
    assert tables.metadata["source_split"] == "calibration"
    assert sum(tables.sizes().values()) > 0
    for layer, t in tables.layers.items():  # every entry states a bound at or above its target
        assert bool((t.bound_V[t.member_V] >= tables.metadata["config"]["target_agreement"]).all())
