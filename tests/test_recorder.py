"""RoutingRecorder sees every MoE layer with rows aligned to token ids, for every family."""

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.capture.recorder import MissingTokenIdsError, RoutingRecorder
from var_moe.tiny import TINY_FAMILIES, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_recorder_rows_align(family):
    model = tiny_model(family)
    got = {}

    def cb(layer, tokens, decision):
        got[layer] = (tokens.ids_T.clone(), decision.topk_idx_TK.clone(), decision.probs_TE.clone())

    ids = torch.randint(3, 99, (2, 5), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model, cb) as rec:
        model(input_ids=ids)
    assert sorted(got) == rec.layer_indices == [m.layer for m in get_adapter(model).moe_layers(model)]
    for layer, (ids_T, idx_TK, probs_TE) in got.items():
        assert ids_T.tolist() == ids.reshape(-1).tolist()
        assert idx_TK.shape == (10, 2)
        torch.testing.assert_close(probs_TE.sum(-1), torch.ones(10))


def test_recorder_refuses_inputs_embeds():
    model = tiny_model("mixtral")
    with RoutingRecorder(model, lambda *a: None):
        with pytest.raises(MissingTokenIdsError):
            model(inputs_embeds=torch.randn(1, 3, 32))


def test_recorder_rejects_dense_layer():
    model = tiny_model("deepseek_v3")
    with pytest.raises(ValueError, match="no MoE block"):
        RoutingRecorder(model, lambda *a: None, layer_indices=[0])
