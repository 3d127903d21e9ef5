"""The committed reference model loads offline and clears its quality bars on the test split.

Re-measures (not reads) perplexity, the unigram baseline and expert load on the first 200 test
sequences, and checks the card's full-split numbers clear the same bars."""

import json

import pytest
import torch

from var_moe.adapters import get_adapter
from var_moe.loading import load_model
from var_moe.perplexity import corpus_perplexity, unigram_counts, unigram_perplexity
from var_moe.reference.card import QUALITY_MAX_PPL_RATIO, QUALITY_MIN_EXPERT_SHARE, expert_load


@pytest.fixture(scope="module")
def reference(reference_model_dir):
    torch.set_num_threads(1)
    return load_model(str(reference_model_dir))


def test_reference_is_a_real_moe(reference, reference_model_dir):
    model, tok = reference
    adapter = get_adapter(model)
    assert adapter.family == "mixtral" and adapter.num_experts == 8 and adapter.top_k == 2
    assert len(adapter.moe_layers(model)) == model.config.num_hidden_layers
    size = sum(p.stat().st_size for p in reference_model_dir.iterdir())
    assert size <= 25 * 2**20, f"model folder is {size / 2**20:.1f} MiB (limit 25)"


def test_quality_bars_on_test_split(reference):
    model, tok = reference
    n = 200
    ppl = corpus_perplexity(model, tok, split="test", num_samples=n)
    uni = unigram_perplexity(tok, unigram_counts(tok), split="test", num_samples=n)
    assert ppl.tokens == uni.tokens > 20_000
    assert ppl.perplexity / uni.perplexity <= QUALITY_MAX_PPL_RATIO, (ppl.perplexity, uni.perplexity)
    load = expert_load(model, tok, "test", num_samples=n)
    assert load["min_top1_share"] >= QUALITY_MIN_EXPERT_SHARE, load


def test_card_reports_full_split_bars(reference_model_dir):
    card = json.loads((reference_model_dir / "card.json").read_text())
    assert card["perplexity_ratio"] <= QUALITY_MAX_PPL_RATIO
    assert card["expert_load"]["min_top1_share"] >= QUALITY_MIN_EXPERT_SHARE
    shares = card["cost_shares"]["shares"]
    assert shares["experts"] == max(shares.values()), "experts must be the largest share of a forward pass"
