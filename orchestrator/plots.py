"""Plots of an evolution run (PNG, matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from namm_core.files import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    return Path(path)


def plot_evolution(history: list[dict], validation: list[dict], path, title: str = "") -> Path:
    """Best / mean / worst population fitness per generation, the validated CMA mean, and the
    population's mean retention on a second axis; stage boundaries as vertical lines."""
    plt = _plt()
    by_gen = defaultdict(list)
    stage_of = {}
    for row in history:
        by_gen[row["generation"]].append(row)
        stage_of[row["generation"]] = row["stage"]
    gens = sorted(by_gen)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if gens:
        fit = [[r["fitness"] for r in by_gen[g] if np.isfinite(r["fitness"])] or [np.nan] for g in gens]
        ax.plot(gens, [max(f) for f in fit], label="best candidate", color="tab:green")
        ax.plot(gens, [np.mean(f) for f in fit], label="population mean", color="tab:blue")
        ax.fill_between(gens, [min(f) for f in fit], [max(f) for f in fit], color="tab:blue", alpha=0.12)
        for g0, g1 in zip(gens, gens[1:]):
            if stage_of[g1] != stage_of[g0]:
                ax.axvline(g1 - 0.5, color="grey", linestyle=":", linewidth=1)
    if validation:
        ax.plot([v["generation"] for v in validation], [v["fitness"] for v in validation], "o-", color="tab:red",
                label="CMA mean (validation)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="full cache")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (1.0 = as good as the full cache)")
    if gens:
        ax2 = ax.twinx()
        ax2.plot(gens, [np.nanmean([r["retention"] for r in by_gen[g]]) for g in gens], color="tab:orange",
                 alpha=0.6, linewidth=1, label="mean retention")
        ax2.set_ylabel("mean cache retention", color="tab:orange")
        ax2.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_retention_per_layer(retention: list[float], path, title: str = "cache retention per layer") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(retention)), retention, color="tab:purple")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept / seen")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
