"""VAR off, and VAR on with empty tables, reproduce the original model exactly.

Checked for several MoE families, in a plain forward over a left-padded batch and in greedy
`generate()` with a KV cache (scores of every step compared bit for bit), and `restore()` gives
back the original router modules. Run: `pytest tests/test_var_exact.py`.
"""

import pytest
import torch

from var_moe.tiny import tiny_model
from var_moe.var.config import VARConfig
from var_moe.var.wrapper import VARModelWrapper

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe"]
torch.set_num_threads(1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    ids[mask == 0] = 0
    return ids, mask


def _generate(model, ids, mask):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state", ["disabled", "enabled_empty"])
def test_forward_and_generate_exact(family, state):
    model = tiny_model(family, seed=1)
    ids, mask = _batch()
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    ref_seq, ref_scores = _generate(model, ids, mask)
    originals = [getattr(layer.mlp, "gate") for layer in model.model.layers if hasattr(layer.mlp, "gate")]

    cfg = VARConfig(enable_var=(state == "enabled_empty"))
    wrapper = VARModelWrapper(model, cfg)
    assert wrapper.var_enabled == (state == "enabled_empty")
    with torch.no_grad():
        logits = wrapper(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    seq, scores = _generate(wrapper, ids, mask)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    if state == "enabled_empty":
        counts = wrapper.tier_counts()
        # forward + generate prefill (valid prompt tokens only), then 4 decode steps x 3 rows
        expected = (2 * int(mask.sum()) + 4 * 3) * len(wrapper.routers)
        assert sum(v for (l, t), v in counts.items() if t == "learned") == expected
        assert sum(v for (l, t), v in counts.items() if t != "learned") == 0
    wrapper.restore()
    now = [getattr(layer.mlp, "gate") for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    assert all(a is b for a, b in zip(originals, now))


def test_restore_as_context_manager_and_suspended():
    model = tiny_model("mixtral", seed=2)
    gate = model.model.layers[0].mlp.gate
    with VARModelWrapper(model, VARConfig()) as w:
        assert model.model.layers[0].mlp.gate is w.routers[0]
        with w.suspended():
            assert model.model.layers[0].mlp.gate is gate
        assert model.model.layers[0].mlp.gate is w.routers[0]
    assert model.model.layers[0].mlp.gate is gate
