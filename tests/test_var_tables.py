"""Verified tables: Wilson bound vs scipy, refusal of test-split statistics, file round-trip and
refusal of files made for another model or cut short, the committed reference tables. The admission rule is
checked against a brute force in tests/test_var_verification.py. Run: `pytest tests/test_var_tables.py`."""

import numpy as np
import pytest
import torch
from scipy import stats as sps

from var_moe.adapters import get_adapter
from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.certify import wilson_lower_bound
from var_moe.var.tables import VARTables

torch.set_num_threads(1)


def test_wilson_matches_scipy():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 500, size=200)
    x = rng.integers(0, n + 1)
    ours = wilson_lower_bound(torch.as_tensor(x), torch.as_tensor(n), 1.959963984540054).numpy()
    ref = np.array([sps.binomtest(int(a), int(b)).proportion_ci(0.95, method="wilson").low for a, b in zip(x, n)])
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    assert float(wilson_lower_bound(torch.tensor([0]), torch.tensor([0]), 1.96)) == 0.0


def tiny_tables(model, cfg):
    from test_var_verification import batches

    from var_moe.var.evidence import collect_evidence

    return VARTables.from_evidence(collect_evidence(model, batches(0, n=10), get_adapter(model)), model, get_adapter(model), cfg)


def test_split_metadata_test_is_refused_unless_allowed(tmp_path):
    from var_moe.var.stats_io import check_split

    with pytest.raises(ValueError, match="--allow-test-split"):
        check_split({"split": "test"}, "s.parquet", False)
    with pytest.raises(ValueError, match="--allow-test-split"):
        check_split({"config": {"split": "test"}}, "s.parquet", False)
    check_split({"split": "test"}, "s.parquet", True)
    check_split({"split": "calibration"}, "s.parquet", False)


def test_save_load_and_refusal(tmp_path):
    model = tiny_model("mixtral", seed=0)
    tables = tiny_tables(model, VARConfig(frequency_threshold=4, target_agreement=0.5))
    assert sum(tables.sizes().values()) > 0
    path = tables.save(tmp_path / "t.safetensors")
    assert (tmp_path / "t.json").exists()
    back = VARTables.load(path, model)
    for l in (0, 1):
        for name in ("experts_VK", "weights_VK", "member_V", "bound_V", "agree_V", "total_V"):
            assert torch.equal(getattr(back[l], name), getattr(tables[l], name))
        assert all(torch.equal(a, b) for a, b in zip(back.pairs[l], tables.pairs[l]))
        assert torch.equal(back.global_sets[l], tables.global_sets[l])
    with pytest.raises(ValueError, match="router_fingerprint"):
        VARTables.load(path, tiny_model("mixtral", seed=5))  # same shapes, other weights
    with pytest.raises(ValueError, match="model_type"):
        VARTables.load(path, tiny_model("olmoe", seed=0))
    with pytest.raises(ValueError, match="num_experts"):
        VARTables.load(path, tiny_model("mixtral", seed=0, num_local_experts=8), check_fingerprint=False)
    with pytest.raises(FileNotFoundError):
        VARTables.load(tmp_path / "missing.safetensors")


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


def test_from_texts_builds_certified_tables_for_a_tiny_model():
    """Callers without a capture (tests, the server's tiny models) build tables from documents."""

    class Tok:  # whitespace "tokenizer" over a fixed vocabulary
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + ord(w) - ord("a") for w in text.split()]}

    model = tiny_model("mixtral", seed=3)
    texts = [" ".join(["a", "b", "c", "d", "e"][(i + j) % 5] for j in range(40)) for i in range(30)]
    tables = VARTables.from_texts(model, Tok(), texts, VARConfig(frequency_threshold=2, target_agreement=0.5))
    assert tables.metadata["verification"]["candidates"] > 0
    assert tables.metadata["source_documents"] == [15, 15]
    tables.check_model(model)


def test_tables_and_evidence_readers_refuse_each_other_and_garbage(tmp_path):
    from safetensors.torch import save_file

    from var_moe.errors import InvalidInputError
    from var_moe.var.evidence import Evidence

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))  # a safetensors file without VAR metadata
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    for path in (foreign, garbage):
        with pytest.raises(InvalidInputError, match=str(path.name)):
            VARTables.load(path)
        with pytest.raises(InvalidInputError, match=str(path.name)):
            Evidence.load(path)
    with pytest.raises(FileNotFoundError, match="build-tables"):
        VARTables.load(tmp_path / "missing.safetensors")


def test_a_tables_file_missing_a_tensor_is_refused_by_name(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from var_moe.errors import InvalidInputError

    model = tiny_model("mixtral", seed=0)
    path = VARTables.empty(model, get_adapter(model)).save(tmp_path / "t.safetensors")
    tensors = load_file(str(path))
    layer = json.loads(safe_metadata(path)["varmoe_tables"])["layers"][0]
    del tensors[f"layer{layer}.total_V"]
    cut = tmp_path / "cut.safetensors"
    save_file(tensors, str(cut), metadata=safe_metadata(path))
    with pytest.raises(InvalidInputError, match=f"layer{layer}.total_V"):
        VARTables.load(cut)
    # a format-1 file (no select_V) still loads, with select_V zero
    old = load_file(str(path))
    del old[f"layer{layer}.select_V"]
    save_file(old, str(cut), metadata=safe_metadata(path))
    assert int(VARTables.load(cut).layers[layer].select_V.abs().sum()) == 0


def safe_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()
