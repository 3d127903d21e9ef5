"""The seed's own sequence on a tiny Mixtral, with statistics computed in memory (no document
metadata): RouterAnalyzer -> analyze_batch a few times -> vocabulary analysis saved to Parquet ->
`VARConfig.from_routing_stats(path, frequency_threshold=5)` -> `VARMixtralWrapper(model, config)`
-> generate. The tables are in-sample and say so (metadata, printed summary, server status).

Run: `pytest tests/test_var_seed_workflow.py` (seconds, CPU).
"""

from __future__ import annotations

import pytest
import torch

from var_moe import RouterAnalyzer, VARConfig, VARMixtralWrapper
from var_moe.tiny import tiny_model
from var_moe.var.certify import score_pvalues
from var_moe.var.in_sample import CERTIFY_COMMANDS

torch.set_num_threads(1)


def _prompt_batch() -> torch.Tensor:
    """8 identical rows of 12 distinct token ids: each token is routed the same way every time."""
    row = torch.randperm(90, generator=torch.Generator().manual_seed(0))[:12] + 3
    return row.repeat(8, 1)


@pytest.mark.parametrize("save", ["to_parquet", "write_parquet"])
def test_seed_sequence_builds_uncertified_tables(tmp_path, capsys, save):
    model = tiny_model("mixtral", seed=0)
    analyzer = RouterAnalyzer(model)
    ids = _prompt_batch()
    for _ in range(6):  # 48 occurrences of each of the 12 tokens
        analyzer.analyze_batch(ids, torch.ones_like(ids))
    path = tmp_path / "routing_stats.parquet"
    if save == "to_parquet":  # the seed's way: the DataFrame itself
        analyzer.get_vocabulary_analysis().to_parquet(path)
    else:
        analyzer.write_parquet(path)
    analyzer.detach()

    config = VARConfig.from_routing_stats(path, frequency_threshold=5)
    var_model = VARMixtralWrapper(model, config)
    tables = var_model.tables
    assert tables.metadata["certified"] is False
    assert CERTIFY_COMMANDS in tables.uncertified_note()

    df = analyzer.get_vocabulary_analysis()
    for layer in (0, 1):
        sub = df[df["layer"] == layer]
        t = tables[layer]
        members = set(torch.nonzero(t.member_V).squeeze(1).tolist())
        # brute force: every token whose in-sample agreement passes the test on its own (all p-values here
        # are equal, so Benjamini-Hochberg accepts all of them or none)
        pv = score_pvalues(torch.tensor(sub["modal_set_count"].to_numpy(), dtype=torch.float64),
                           torch.tensor(sub["frequency"].to_numpy(), dtype=torch.float64), config.target_agreement)
        want = {int(tok) for tok, p, f in zip(sub["token_id"], pv.tolist(), sub["frequency"])
                if f >= 5 and p <= (1 - config.confidence_level) / 2}
        assert members == want and len(members) == 12
        for tok, modal in zip(sub["token_id"], sub["modal_topk_set"]):
            assert sorted(t.experts_VK[int(tok)].tolist()) == sorted(int(e) for e in modal)
        torch.testing.assert_close(t.weights_VK[sorted(members)].sum(1), torch.ones(len(members)))

    prompt = ids[:1]
    out = var_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + 4
    assert var_model.get_performance_stats()["overall"]["tier_counts"]["fast"] >= 12 * 2  # the prompt's tokens, 2 layers
    var_model.print_performance_summary()
    assert "UNCERTIFIED" in capsys.readouterr().out
    var_model.restore()


def test_document_statistics_still_certify(reference_model_dir):
    """A capture whose metadata names its documents keeps the held-out path (no in-sample note)."""
    from var_moe.var.stats_io import names_documents, read_stats_metadata

    assert names_documents(read_stats_metadata(reference_model_dir / "var" / "routing_stats_calibration.parquet"))


def test_server_status_says_uncertified(reference_model_dir, tmp_path):
    """`varmoe serve --routing-stats` on in-memory statistics: /var/status names the tables uncertified
    and the commands that certify them."""
    import shutil

    import httpx

    from analysis_jobs.server_process import ManagedServer
    from var_moe import load_model

    model_dir = tmp_path / "model"  # the reference model without its committed tables (they would win)
    shutil.copytree(reference_model_dir, model_dir, ignore=shutil.ignore_patterns("var"))
    model, tok = load_model(str(model_dir))
    analyzer = RouterAnalyzer(model)
    ids = tok(["def main():\n    return 0\n", "import os\nimport sys\n"], return_tensors="pt", padding=True)
    for _ in range(3):
        analyzer.analyze_batch(ids["input_ids"], ids["attention_mask"])
    stats = tmp_path / "stats.parquet"
    analyzer.get_vocabulary_analysis().to_parquet(stats)
    with ManagedServer(model_dir, args=["--routing-stats", str(stats)], log_path=tmp_path / "server.log") as s:
        status = httpx.get(f"{s.url}/var/status", timeout=30).json()
    assert status["var"]["available"] and CERTIFY_COMMANDS in status["var"]["tables_uncertified"]
