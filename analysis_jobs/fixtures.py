"""A servable model folder with VAR available, for the tests and short runs of the analysis jobs.

`servable_var_model(tmp)` returns the reference model folder when it holds weights, a tokenizer and
VAR files (tables or calibration statistics); otherwise it writes a seeded tiny Mixtral, a small
byte-level BPE tokenizer trained on var_moe's own sources, calibration routing statistics captured
from those sources (`var/routing_stats_calibration.parquet`) and VAR tables built from the same
sources (`var/var_tables.safetensors`, chosen on even and certified on odd files with thresholds
loose enough for a random model's soft routing), which `varmoe serve` loads by default. Test: used by `pytest tests/test_reliability_*.py tests/test_ab_*.py`.
"""

from __future__ import annotations

from pathlib import Path

from var_moe.loading import REFERENCE_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
VAR_FILES = ("var/var_tables.safetensors", "var/routing_stats_calibration.parquet")


def reference_ready(path: Path = REFERENCE_MODEL_DIR) -> bool:
    return (path / "config.json").exists() and (path / "tokenizer.json").exists() and any(
        (path / f).exists() for f in VAR_FILES)


def tiny_var_model(out_dir: str | Path, seed: int = 0, vocab_size: int = 512, seq_len: int = 64) -> Path:
    import torch

    from var_moe.capture.analyzer import RouterAnalyzer
    from var_moe.corpus import pad_batch
    from var_moe.reference.tokenizer import train_tokenizer
    from var_moe.tiny import tiny_model
    from var_moe.var import VARConfig, VARTables

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text() for p in sorted((REPO_ROOT / "var_moe").rglob("*.py"))]
    tok = train_tokenizer(texts, vocab_size, out)
    model = tiny_model("mixtral", seed, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(out)
    # Calibration statistics from the model's own forward passes over the sources (a few batches).
    ids = [t for text in texts[:40] for t in tok(text)["input_ids"]]
    seqs = [ids[i:i + seq_len] for i in range(0, min(len(ids), 64 * seq_len), seq_len)]
    analyzer = RouterAnalyzer(model, tokenizer=tok)
    with torch.no_grad():
        for i in range(0, len(seqs), 16):
            input_ids, mask = pad_batch(seqs[i:i + 16], tok.pad_token_id)
            analyzer.analyze_batch(input_ids, mask)
    (out / "var").mkdir(exist_ok=True)
    analyzer.write_parquet(out / "var" / "routing_stats_calibration.parquet",
                           {"model": str(out), "dataset": "var_moe sources", "split": "calibration"})
    loose = VARConfig(frequency_threshold=1, target_agreement=0.05, entropy_threshold=None, shadow_rate=0.5)
    VARTables.from_texts(model, tok, texts[:40], loose, max_length=seq_len).save(out / "var" / "var_tables.safetensors")
    return out


def servable_var_model(tmp: str | Path) -> Path:
    if reference_ready():
        return REFERENCE_MODEL_DIR
    return tiny_var_model(Path(tmp) / "tiny-var-moe")
