"""Routing traces: write-then-read round trip, routing arrays (vLLM's shape), layer mapping, and a
recorded trace of a tiny model whose speculative predictions are checked against the gate itself.

Run: `pytest tests/test_offload_trace.py`.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from var_moe.errors import InvalidInputError
from var_moe.offload.schema import TraceFileError
from var_moe.offload.trace import Trace, TraceConfig, load_routing_array


def _toy(t=7, l=3, k=2, e=5):
    rng = np.random.default_rng(1)
    ex = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(l)]) for _ in range(t)]).astype(np.int16)
    probs = rng.random((t, l, k)).astype(np.float32)
    spec = ex.copy()
    spec[:, 0] = -1
    return Trace(np.arange(t, dtype=np.int32), np.array([0, 0, 0, 1, 1, 2, 2], np.int32), ex, e, [1, 2, 3], probs, spec,
                 {"model": "toy"})


def test_write_then_read(tmp_path):
    tr = _toy()
    path = tr.write(tmp_path / "t.parquet")
    back = Trace.read(path)
    assert np.array_equal(back.experts_TLK, tr.experts_TLK) and np.array_equal(back.spec_TLK, tr.spec_TLK)
    assert np.array_equal(back.probs_TLK, tr.probs_TLK) and np.array_equal(back.seq_T, tr.seq_T)
    assert back.layers == [1, 2, 3] and back.num_experts == 5 and back.metadata["model"] == "toy"
    assert pq.read_table(path).column("position").to_pylist() == [0, 1, 2, 0, 1, 0, 1]
    assert back.prev_T.tolist() == [-1, 0, 1, -1, 3, -1, 5]


def test_bad_trace_files(tmp_path):
    with pytest.raises(TraceFileError, match="no such trace"):
        Trace.read(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(TraceFileError, match="not a readable"):
        Trace.read(tmp_path / "junk.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(TraceFileError, match="missing columns"):
        Trace.read(tmp_path / "other.parquet")


def test_routing_array_loads_unchanged(tmp_path):
    arr = np.random.default_rng(0).integers(0, 8, (10, 4, 2)).astype(np.int32)
    np.save(tmp_path / "r.npy", arr)
    np.save(tmp_path / "ids.npy", np.arange(10))
    np.save(tmp_path / "len.npy", np.array([4, 6]))
    tr = load_routing_array(tmp_path / "r.npy", 8, tmp_path / "ids.npy", tmp_path / "len.npy")
    assert np.array_equal(tr.experts_TLK, arr) and tr.seq_T.tolist() == [0] * 4 + [1] * 6
    assert tr.probs_TLK is None and not tr.has_spec
    back = Trace.read(tr.write(tmp_path / "t.parquet"))
    assert back.probs_TLK is None and back.spec_TLK is None and np.array_equal(back.experts_TLK, arr)
    np.save(tmp_path / "bad.npy", np.arange(10))
    with pytest.raises(InvalidInputError, match="tokens, layers, top-k"):
        load_routing_array(tmp_path / "bad.npy", 8)
    with pytest.raises(InvalidInputError, match="expert ids"):
        load_routing_array(tmp_path / "r.npy", 4)
    np.save(tmp_path / "len2.npy", np.array([4, 5]))
    with pytest.raises(InvalidInputError, match="sum to 10"):
        load_routing_array(tmp_path / "r.npy", 8, seq_lengths=tmp_path / "len2.npy")


def test_map_layers_is_cyclic():
    tr = _toy()
    m = tr.map_layers(7)
    assert m.num_layers == 7 and np.array_equal(m.experts_TLK[:, 4], tr.experts_TLK[:, 1])
    assert (m.spec_TLK[:, 3] == -1).all()  # layer 3 takes trace layer 0: no speculative prediction


class _Tok:
    """A stand-in tokenizer: the tiny model's vocabulary has no text tokenizer."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text[:40]]}


def test_recorded_trace_matches_the_gates(tmp_path):
    from var_moe.adapters import get_adapter
    from var_moe.offload.trace import record_trace
    from var_moe.tiny import tiny_model

    torch.manual_seed(0)
    model = tiny_model("mixtral", seed=0)
    from var_moe.corpus import split_of

    # documents whose names hash into the test split (the split is decided by the name)
    names = [n for n in (f"doc{i}.txt" for i in range(200)) if split_of(n) == "test"][:3]
    texts = ["def f(x):\n    return x + 1\n" * 3, "class A:\n    pass\n", "import os\nprint(os.sep)\n"]
    for name, text in zip(names, texts):
        (tmp_path / name).write_text(text)
    cfg = TraceConfig(model="tiny", dataset=str(tmp_path), split="test", num_samples=4, max_length=16, batch_size=2)
    tr = record_trace(model, _Tok(), cfg)
    assert tr.num_tokens > 8 and len(set(tr.seq_T.tolist())) == 4
    adapter = get_adapter(model)
    moe = adapter.moe_layers(model)
    # recompute routing and the speculative prediction from captured block inputs
    from var_moe.corpus import iter_batches

    inputs = {}
    hooks = [m.block.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0].detach()))
             for i, m in enumerate(moe)]
    rows_e, rows_s = [], []
    with torch.no_grad():
        for ids, mask in iter_batches(_Tok(), cfg.dataset, cfg.split, cfg.max_length, cfg.batch_size, cfg.num_samples):
            model(input_ids=ids, attention_mask=mask)
            valid = mask.reshape(-1).bool()
            h = {i: x.reshape(-1, x.shape[-1]) for i, x in inputs.items()}
            rows_e.append(torch.stack([adapter.decision(moe[i].router(h[i])).topk_idx_TK for i in range(len(moe))], 1)[valid])
            rows_s.append(torch.stack([adapter.decision(moe[i].router(h[i - 1])).topk_idx_TK for i in range(1, len(moe))], 1)[valid])
    for hk in hooks:
        hk.remove()
    assert np.array_equal(tr.experts_TLK, torch.cat(rows_e).numpy())
    assert np.array_equal(tr.spec_TLK[:, 1:], torch.cat(rows_s).numpy()) and (tr.spec_TLK[:, 0] == -1).all()
    assert np.allclose(tr.probs_TLK.sum(-1) <= 1.0 + 1e-5, True)
