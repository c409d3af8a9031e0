"""PNG plots of re-identification (with intervals) and of leakage against re-identification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from anonrisk.stages import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_reid(results: dict[str, Any], path: Path, metric: str = "top1") -> None:
    """Grouped bars: anonymizer x protocol/mode, 95 % intervals as error bars, chance as a line."""
    plt = _plt()
    names = list(results)
    keys = list(next(iter(results.values()))["protocols"])
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) * max(1, len(keys) / 3)), 4))
    for j, key in enumerate(keys):
        vals = np.array([results[n]["protocols"][key][metric]["value"] for n in names])
        ci = np.array([results[n]["protocols"][key][metric]["ci95"] for n in names])
        err = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))
        ax.bar(np.arange(len(names)) + (j - (len(keys) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=key)
    chance = next(iter(results.values()))["protocols"][keys[0]][metric]["chance"]
    ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance ({chance:.3f})")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"re-identification {metric}")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    plt.close(fig)


def plot_leakage_vs_reid(results: dict[str, Any], path: Path, key: str = "full-ref/exclude-source") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, r in results.items():
        if "leakage" not in r:
            continue
        p = r["protocols"].get(key) or next(iter(r["protocols"].values()))
        v = p["top1"]
        ax.errorbar(r["leakage"]["edge_f"], v["value"], yerr=[[v["value"] - v["ci95"][0]], [v["ci95"][1] - v["value"]]], fmt="o", capsize=3)
        ax.annotate(name, (r["leakage"]["edge_f"], v["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("edge F-score (original vs anonymized)")
    ax.set_ylabel(f"top-1 re-identification ({key})")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    _save(fig, path)
    plt.close(fig)
