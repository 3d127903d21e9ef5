"""Reporting for the offloading simulator: the printed table, the JSON document and the figure.

`format_table(results)` prints one row per policy (hit rate, bytes moved, stall share, tokens/s);
`results_document(...)` is the JSON written by `varmoe simulate` (keyed by policy name under
`policies`, with the config, hardware profile, model shape and predictor accuracy beside it);
`plot_policies(results)` returns a Figure (tokens/s and hit rate per policy; hatched bars so it
reads in greyscale), saved as PNG and PDF by `save_figure`. Test: `pytest tests/test_offload_cli.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .simulator import SimResult


def format_table(results: dict[str, SimResult]) -> str:
    head = f"{'policy':<12}{'hit rate':>9}{'GB moved':>10}{'prefetch':>10}{'useful':>8}{'stall %':>9}{'tokens/s':>10}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        useful = r.useful_prefetches / r.prefetch_transfers if r.prefetch_transfers else float("nan")
        lines.append(f"{name:<12}{r.hit_rate:>9.3f}{r.bytes_moved / 1e9:>10.2f}{r.prefetch_transfers:>10d}"
                     f"{useful:>8.2f}{100 * r.stall_share:>9.1f}{r.tokens_per_s:>10.3f}")
    return "\n".join(lines)


def format_predictors(acc: dict[str, Any]) -> str:
    """Per predictor: coverage / precision / recall over all tokens, one column per layer, and the lead."""
    lines = [f"{'predictor':<12}{'measure':<11}per layer"]
    for name, a in acc.items():
        if not isinstance(a, dict) or "coverage" not in a:
            continue
        for key in ("coverage", "precision", "recall_all", "lead_layers"):
            lines.append(f"{name:<12}{key.replace('_layers', ''):<11}" + " ".join(f"{x:6.3f}" for x in a[key]))
    if "var_token_share" in acc:
        s = acc["var_token_share"]
        lines.append(f"VAR table tokens: {100 * s['any_layer']:.1f}% of tokens at some layer, {100 * s['all_layers']:.1f}% "
                     f"at every layer, {s['mean_layers_covered']:.2f} layers per token on average")
    return "\n".join(lines)


def results_document(results: dict[str, SimResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {**meta, "policies": {name: r.to_dict() for name, r in results.items()}}


def plot_policies(results: dict[str, SimResult], title: str = "") -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    hatches = ["", "//", "..", "xx", "\\\\", "--", "++", "oo", "**", "||"]
    for i, n in enumerate(names):
        ax1.bar(i, results[n].tokens_per_s, color="0.75", edgecolor="black", hatch=hatches[i % len(hatches)])
        ax2.bar(i, results[n].hit_rate, color="0.75", edgecolor="black", hatch=hatches[i % len(hatches)])
    for ax, label in ((ax1, "decoding speed (tokens/s)"), (ax2, "expert hit rate (share of needed experts)")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel(label)
    ax2.set_ylim(0, 1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, stem: str | Path) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=130)
    return paths
