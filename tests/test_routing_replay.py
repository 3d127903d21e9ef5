"""Routing replay (var_moe/routing_replay.py): a captured routing replayed gives the original logits
exactly; a changed routing reaches the experts as given, with the router's own probabilities at
those experts as weights; a routing of the wrong shape is refused."""

from __future__ import annotations

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.errors import InvalidInputError
from var_moe.routing_replay import RoutingReplay, forward_with_routing
from var_moe.routing_tap import RoutingTap
from var_moe.tiny import tiny_model


def captured(model, ids_1T):
    tap = RoutingTap(model, count=False).attach()
    tap.recording = True
    with torch.no_grad():
        logits = model(input_ids=ids_1T).logits
    tap.detach()
    return logits, tap.last_LTK.permute(1, 0, 2).tolist()  # [tokens][layers][k], the API's layout


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_replaying_a_capture_gives_the_original_logits(family):
    model = tiny_model(family, seed=4)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    logits, routing = captured(model, ids)
    replayed = forward_with_routing(model, ids, routing)
    torch.testing.assert_close(replayed, logits, rtol=0, atol=0)


def test_a_changed_routing_reaches_the_experts_with_the_routers_weights():
    model = tiny_model("mixtral", seed=5)
    adapter = get_adapter(model)
    e = adapter.num_experts
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    logits, routing = captured(model, ids)
    changed = torch.tensor(routing)
    changed[:, 0] = (changed[:, 0] + 1) % e  # every token, first MoE layer: other experts
    changed[:, 0, 1] = torch.where(changed[:, 0, 1] == changed[:, 0, 0], (changed[:, 0, 1] + 1) % e, changed[:, 0, 1])
    moe = adapter.moe_layers(model)
    got, scores = {}, {}
    h1 = moe[0].experts.register_forward_pre_hook(lambda m, a: got.__setitem__("idx", a[1].clone()) or
                                                  got.__setitem__("w", a[2].clone()))
    h2 = moe[0].router.register_forward_hook(lambda m, a, o: scores.__setitem__("logits", o[0].clone()))
    out = forward_with_routing(model, ids, changed)
    h1.remove()
    h2.remove()
    assert torch.equal(got["idx"].long(), changed[:, 0])
    p = torch.softmax(scores["logits"].float(), -1).gather(1, changed[:, 0])
    torch.testing.assert_close(got["w"].float(), p / p.sum(1, keepdim=True))
    assert not torch.allclose(out, logits)


def test_wrong_shapes_are_refused():
    model = tiny_model("mixtral", seed=6)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    _, routing = captured(model, ids)
    with pytest.raises(InvalidInputError, match="rows"):
        forward_with_routing(model, ids[:, :4], routing)
    with pytest.raises(InvalidInputError, match="MoE layers"):
        RoutingReplay(model, [r[:1] for r in routing])
    with pytest.raises(InvalidInputError, match="integer"):
        RoutingReplay(model, torch.zeros(5, 2, 2))
