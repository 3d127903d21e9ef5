"""Publication figures of Phase 1 (and the Phase 2 frontier, `fig_frontier`): one function per
figure (DataFrame/dict in, Figure out).

Every figure has labelled axes with units and is readable in greyscale (grey colour maps, line
styles and markers instead of hues). `save_figure` writes PNG and PDF; `plot_all` makes every
figure the inputs allow. CLI: `varmoe plot`. Test: `pytest tests/test_validation_cli.py`.

The Mixtral comparison uses `MIXTRAL_TABLE5` below (random baselines only; see its note).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..capture.schema import densify_experts  # noqa: E402
from . import stats  # noqa: E402

STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "x")]
GREYS = ["0.0", "0.35", "0.55", "0.2", "0.45", "0.65"]

# Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088), Table 5 reports the share of
# consecutive tokens assigned the same expert for Mixtral 8x7B (layers 0, 15, 31). Its per-layer
# values are NOT reproduced here: no copy of the paper could be checked offline, and recalled
# numbers are not data. Only the random baselines are drawn; they follow from E = 8, k = 2.
MIXTRAL_TABLE5: dict[str, Any] = {
    "source": "Jiang et al. 2024, Mixtral of Experts, arXiv:2401.04088, Table 5",
    "num_layers": 32,
    "random_first_choice": 1 / 8,
    "random_first_or_second_choice": 1 - (6 / 8) * (5 / 7),  # any shared expert between top-2 sets
}


def save_figure(fig: plt.Figure, out_dir: str | Path, name: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _layers(df: pd.DataFrame) -> list[int]:
    return sorted(int(x) for x in df["layer"].unique())


def _ln_e(meta: dict[str, Any]) -> float:
    return math.log(int(meta["num_experts"]))


def _grid(n: int) -> tuple[plt.Figure, np.ndarray]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows + 0.6), squeeze=False, sharey=True,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def fig_frequency_vs_entropy(df: pd.DataFrame, meta: dict[str, Any]) -> plt.Figure:
    """Hexbin of log10 frequency vs mean router entropy, one panel per layer."""
    layers = _layers(df)
    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers):
        sub = df[(df["layer"] == layer) & (df["frequency"] > 0)]
        hb = ax.hexbin(np.log10(sub["frequency"]), sub["mean_entropy"], gridsize=30, cmap="Greys", bins="log", mincnt=1)
        ax.axhline(_ln_e(meta), ls="--", c="0.4", lw=1)
        ax.set_title(f"layer {layer}")
    fig.supxlabel("log10 token frequency (occurrences in the split)")
    axes[0].set_ylabel("mean router entropy (nats)")
    fig.colorbar(hb, ax=list(axes), label="tokens per cell (log scale)")
    fig.suptitle(f"Frequency vs routing entropy (dashed: max ln E = {_ln_e(meta):.2f} nats)")
    return fig


def fig_entropy_distribution(df: pd.DataFrame, meta: dict[str, Any]) -> plt.Figure:
    """Box plots per layer of token mean entropy, and the occurrence-weighted CDF per layer."""
    layers = _layers(df)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.boxplot([df[df["layer"] == l]["mean_entropy"].dropna() for l in layers], tick_labels=[str(l) for l in layers],
              patch_artist=False, medianprops={"color": "black"}, flierprops={"markersize": 2})
    a.axhline(_ln_e(meta), ls="--", c="0.4", lw=1, label="max ln E")
    a.set_xlabel("layer")
    a.set_ylabel("token mean router entropy (nats)")
    a.legend(loc="lower right")
    grid = np.linspace(0, _ln_e(meta), 101)
    for i, layer in enumerate(layers):
        sub = df[df["layer"] == layer]
        ls, mk = STYLES[i % len(STYLES)]
        cdf = stats.coverage_curve(sub["frequency"], sub["mean_entropy"], 0, grid)
        b.plot(grid, cdf, ls=ls, marker=mk, markevery=20, c=GREYS[i % len(GREYS)], label=f"layer {layer}")
    b.set_xlabel("mean router entropy threshold (nats)")
    b.set_ylabel("share of occurrences below threshold")
    b.legend()
    fig.suptitle("Router entropy distribution per layer")
    return fig


def fig_consistency_vs_frequency(df: pd.DataFrame, meta: dict[str, Any]) -> plt.Figure:
    """Top-1 consistency vs log frequency: hexbin per layer with the binned median."""
    layers = _layers(df)
    fig, axes = _grid(len(layers))
    for ax, layer in zip(axes, layers):
        sub = df[(df["layer"] == layer) & (df["frequency"] > 0)]
        x = np.log10(sub["frequency"].to_numpy(np.float64))
        y = sub["routing_consistency"].to_numpy(np.float64)
        hb = ax.hexbin(x, y, gridsize=25, cmap="Greys", bins="log", mincnt=1)
        edges = np.linspace(x.min(), x.max() + 1e-9, 11)
        which = np.digitize(x, edges)
        med = [(edges[i - 1:i + 1].mean(), np.median(y[which == i])) for i in range(1, 11) if (which == i).any()]
        if med:
            ax.plot(*zip(*med), c="black", marker="o", lw=1.5, label="binned median")
        ax.axhline(1 / int(meta["num_experts"]), ls=":", c="0.4", lw=1, label="1/E")
        ax.set_title(f"layer {layer}")
    fig.supxlabel("log10 token frequency (occurrences in the split)")
    axes[0].set_ylabel("top-1 routing consistency (share)")
    axes[0].legend(loc="lower right", fontsize=7)
    fig.colorbar(hb, ax=list(axes), label="tokens per cell (log scale)")
    fig.suptitle("Top-1 consistency vs frequency")
    return fig


def fig_coverage_curves(df: pd.DataFrame, meta: dict[str, Any], min_frequencies: tuple[int, ...] = (1, 10, 100)) -> plt.Figure:
    """Fast-path coverage vs entropy threshold and vs consistency threshold (all layers pooled)."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    ent_grid = np.linspace(0, _ln_e(meta), 101)
    cons_grid = np.linspace(0, 1, 101)
    f, e, c = df["frequency"], df["mean_entropy"], df["routing_consistency"]
    for i, mf in enumerate(min_frequencies):
        ls, mk = STYLES[i % len(STYLES)]
        kw = dict(ls=ls, marker=mk, markevery=20, c=GREYS[i % len(GREYS)], label=f"frequency >= {mf}")
        a.plot(ent_grid, stats.coverage_curve(f, e, mf, ent_grid), **kw)
        # consistency >= t  <=>  -consistency < -t (+ tiny), reusing the below-threshold curve
        b.plot(cons_grid, stats.coverage_curve(f, -c, mf, -cons_grid + 1e-12), **kw)
    a.axvline(0.5, ls=":", c="0.5", lw=1)
    a.set_xlabel("mean router entropy threshold (nats)")
    a.set_ylabel("share of occurrences on the fast path")
    b.set_xlabel("minimum top-1 consistency (share)")
    a.legend()
    fig.suptitle("Fast-path coverage vs threshold (all layers pooled)")
    return fig


HEATMAP_MAX_LAYERS = 4  # panels of the token x expert heatmap (evenly spaced layers, first and last kept)


def fig_token_expert_heatmap(df: pd.DataFrame, meta: dict[str, Any], n: int = 50) -> plt.Figure:
    """Share of each expert as top-1 for the n most frequent tokens, one panel per layer (at most
    HEATMAP_MAX_LAYERS layers, so deep stacks with many experts give a figure of bounded size)."""
    all_layers = _layers(df)
    pick = np.unique(np.linspace(0, len(all_layers) - 1, min(len(all_layers), HEATMAP_MAX_LAYERS)).round().astype(int))
    layers = [all_layers[i] for i in pick]
    e = int(meta["num_experts"])
    panel = min(max(0.25 * e, 2.0), 8.0)  # inches per panel
    fig, axes = plt.subplots(1, len(layers), figsize=(1.2 + panel * len(layers) + 1.5, 0.18 * n + 1.5), squeeze=False)
    first = df[df["layer"] == layers[0]].nlargest(n, "frequency")
    order = first["token_id"].to_numpy()
    labels = [repr(s)[1:-1].replace(" ", "\u2423")[:12] if isinstance(s, str) else str(t) for s, t in
              zip(first.get("token_str", first["token_id"]), order)]
    for ax, layer in zip(axes.flat, layers):
        sub = df[df["layer"] == layer].set_index("token_id").reindex(order)
        seen = sub["expert_ids"].map(lambda x: isinstance(x, (list, np.ndarray))).to_numpy()
        counts = np.zeros((len(sub), e))
        counts[seen] = densify_experts(sub[seen], "top1_counts", e)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert index")
        ax.set_xticks(range(0, e, max(1, e // 8)))
        ax.set_yticks(range(len(order)))
        ax.set_yticklabels(labels if layer == layers[0] else [], fontsize=6)
    axes.flat[0].set_ylabel(f"{n} most frequent tokens (most frequent on top)")
    fig.colorbar(im, ax=list(axes.flat), label="share of occurrences routed top-1 to the expert")
    return fig


def fig_heldout(heldout: dict[str, Any]) -> plt.Figure:
    """Held-out predictability per layer: trained model (top row) above its random-init control (bottom row)."""
    rows = pd.DataFrame([r for r in heldout["rows"] if r["layer"] != "all"])
    rows["layer"] = rows["layer"].astype(int)
    metrics = [("exact", "exact top-k set match"), ("top1", "top-1 expert hit"), ("overlap", "mean overlap with top-k set")]
    models = [m for m in ("trained", "control") if (rows["model"] == m).any()]
    preds = [p for p in heldout["predictors"] if not p.startswith("stats_")]  # file-read tables duplicate these
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3.6 * len(models)), sharey=True, sharex=True,
                             squeeze=False, layout="constrained")
    for r, model in enumerate(models):
        for c, (metric, label) in enumerate(metrics):
            ax = axes[r, c]
            for i, pred in enumerate(preds):
                ls, mk = STYLES[i % len(STYLES)]
                sub = rows[(rows["predictor"] == pred) & (rows["model"] == model)].sort_values("layer")
                ax.plot(sub["layer"], sub[metric], ls=ls, marker=mk, c=GREYS[i % len(GREYS)], label=pred)
            if metric == "exact" and heldout.get("random_exact_baseline") is not None:
                ax.axhline(heldout["random_exact_baseline"], ls=":", c="0.6", lw=1, label="random set")
            ax.set_title(f"{'trained model' if model == 'trained' else 'random-init control'}: {label}", fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.set_xticks(sorted(rows["layer"].unique()))
            if c == 0:
                ax.set_ylabel("share of test tokens")
            if r == len(models) - 1:
                ax.set_xlabel("layer")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=8)
    fig.suptitle(f"Held-out predictability: tables from the {heldout.get('calibration_split', 'calibration')} split, "
                 f"scored on {heldout.get('num_tokens_test')} {heldout.get('test_split', 'test')} tokens")
    return fig


def fig_consecutive_rates(meta: dict[str, Any]) -> plt.Figure:
    """Our consecutive-token same-expert rates by relative depth, with the random baselines of Mixtral's Table 5."""
    cons = meta.get("consecutive") or {}
    layers = sorted(int(k) for k in cons)
    depth = [l / max(max(layers), 1) for l in layers] if layers else []
    e = int(meta["num_experts"])
    k = int(meta.get("top_k") or 2)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    rate = lambda key: [cons[str(l)].get(key) for l in layers]  # noqa: E731
    if layers:
        a.plot(depth, rate("same_top1_rate"), "-o", c="black", label="this model: same top-1")
        if all(v is not None for v in rate("top2_sets_intersect_rate")):
            b.plot(depth, rate("top2_sets_intersect_rate"), "-o", c="black", label="this model: top-k sets share an expert")
        b.plot(depth, rate("top1_in_prev_top2_rate"), "--s", c="0.4", label="this model: top-1 in previous top-k")
    a.axhline(1 / e, ls=":", c="0.5", label=f"random, this model (1/E = {1 / e:.3f})")
    share_random = 1 - math.comb(e - k, k) / math.comb(e, k)
    b.axhline(share_random, ls=":", c="0.5", label=f"random, shared expert (this model: {share_random:.3f})")
    t = MIXTRAL_TABLE5
    a.axhline(t["random_first_choice"], ls="--", c="0.7", lw=0.8, label="random, Mixtral (1/8)")
    b.axhline(t["random_first_or_second_choice"], ls="--", c="0.7", lw=0.8,
              label="random, Mixtral 'first or second choice' (46%)")
    a.set_title("consecutive tokens: same first-choice expert")
    b.set_title("consecutive tokens: shared experts")
    for ax in (a, b):
        ax.set_xlabel("relative depth (layer / last layer)")
        ax.set_ylabel("share of consecutive token pairs")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.suptitle("Mixtral 8x7B's per-layer values (Jiang et al. 2024, arXiv:2401.04088, Table 5) are not drawn: "
                 "they could not be checked offline.\nCompare with the paper's table; the dashed lines are the random "
                 "baselines for E = 8, k = 2 that its caption gives.", fontsize=7, y=0.02, va="bottom")
    fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
    return fig


def fig_frontier(sweep: dict[str, Any]) -> plt.Figure:
    """Phase 2 frontier from a `varmoe sweep` JSON: fast-tier share and paired speed ratio against
    the perplexity change (with its paired 95% interval); marker = target agreement, filled =
    no adaptive k, open = adaptive k."""
    rows = pd.DataFrame(sweep["runtime"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    targets = sorted(rows["target_agreement"].unique())
    for i, t in enumerate(targets):
        sub = rows[rows["target_agreement"] == t]
        for adaptive in (False, True):
            part = sub[sub["adaptive_k_min_weight"].notna() == adaptive]
            if part.empty:
                continue
            x = part["perplexity_change_pct"].to_numpy()
            lo = x - np.array([c[0] for c in part["perplexity_change_ci95_pct"]])
            hi = np.array([c[1] for c in part["perplexity_change_ci95_pct"]]) - x
            fast = np.array([d["fast"] for d in part["routing_distribution"]]) * 100
            face = "none" if adaptive else GREYS[i % len(GREYS)]
            label = f"target {t:g}" + (" + adaptive k" if adaptive else "")
            for ax, y in ((axes[0], fast), (axes[1], part["speed_ratio"].to_numpy())):
                ax.errorbar(x, y, xerr=[lo, hi], fmt=STYLES[i % len(STYLES)][1], mfc=face, color=GREYS[i % len(GREYS)],
                            ecolor="0.7", capsize=2, label=label)
    axes[0].set_ylabel("fast-tier share of routing decisions (%)")
    axes[1].set_ylabel("paired speed ratio, baseline time / VAR time")
    axes[1].axhline(1.0, color="0.6", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("perplexity change vs unmodified model (%)")
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("VAR frontier on whole test documents (bars: paired 95% bootstrap over documents)")
    fig.tight_layout()
    return fig


def plot_all(df: pd.DataFrame, meta: dict[str, Any], out_dir: str | Path, heldout: dict[str, Any] | None = None) -> list[Path]:
    """Every figure the inputs allow; returns the written paths."""
    df = df[df["frequency"] > 0]
    made = [
        ("frequency_vs_entropy", fig_frequency_vs_entropy(df, meta)),
        ("entropy_distribution", fig_entropy_distribution(df, meta)),
        ("consistency_vs_frequency", fig_consistency_vs_frequency(df, meta)),
        ("coverage_curves", fig_coverage_curves(df, meta)),
        ("token_expert_heatmap", fig_token_expert_heatmap(df, meta)),
    ]
    if meta.get("consecutive"):
        made.append(("consecutive_rates", fig_consecutive_rates(meta)))
    if heldout is not None:
        made.append(("heldout_predictability", fig_heldout(heldout)))
    paths: list[Path] = []
    for name, fig in made:
        paths += save_figure(fig, out_dir, name)
    return paths
