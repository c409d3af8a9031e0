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


def _err(metric: dict) -> list[list[float]]:
    lo, hi = metric["ci95"]
    v = metric["value"]
    return [[max(0.0, v - lo)], [max(0.0, hi - v)]] if lo == lo else [[0.0], [0.0]]


def plot_reid(results: dict[str, Any], path: Path, key: str = "full-ref/exclude-source", metric: str = "top1") -> None:
    """Grouped bars: anonymizer x attack on one protocol, 95 % intervals as error bars, chance as a line."""
    from anonrisk.report.card import ran

    plt = _plt()
    names = list(results)
    attacks = list(dict.fromkeys(a for card in results.values() for a in ran(card)))
    width = 0.8 / max(1, len(attacks))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * max(1, len(attacks) / 3)), 4))
    chance = None
    for j, a in enumerate(attacks):
        xs, vals, errs = [], [], [[], []]
        for i, n in enumerate(names):
            r = ran(results[n]).get(a)
            if not r or key not in r["protocols"]:
                continue
            m = r["protocols"][key][metric]
            chance = m["chance"]
            xs.append(i + (j - (len(attacks) - 1) / 2) * width)
            vals.append(m["value"])
            e = _err(m)
            errs[0].append(e[0][0])
            errs[1].append(e[1][0])
        ax.bar(xs, vals, width, yerr=np.array(errs), capsize=2, label=a)
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance ({chance:.3f})")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"re-identification {metric} ({key})")
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    _save(fig, path)
    plt.close(fig)


def plot_card(name: str, card: dict[str, Any], path: Path, metric: str = "top1") -> None:
    """One anonymizer: attack x protocol/mode bars with intervals, chance per protocol as a marker."""
    from anonrisk.report.card import protocol_keys, ran

    plt = _plt()
    attacks = ran(card)
    keys = protocol_keys({name: card})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys) * max(1, len(attacks) / 3)), 3.6))
    width = 0.8 / max(1, len(attacks))
    for j, (a, r) in enumerate(attacks.items()):
        ms = [r["protocols"][k][metric] for k in keys]
        errs = np.array([[e[0][0] for e in map(_err, ms)], [e[1][0] for e in map(_err, ms)]])
        ax.bar(np.arange(len(keys)) + (j - (len(attacks) - 1) / 2) * width, [m["value"] for m in ms], width, yerr=errs, capsize=2, label=a)
    if attacks:
        first = next(iter(attacks.values()))
        ax.scatter(range(len(keys)), [first["protocols"][k][metric]["chance"] for k in keys], marker="_", s=400, color="k", label="chance", zorder=3)
    ax.set_xticks(range(len(keys)), keys, rotation=20, fontsize=7)
    ax.set_ylabel(f"re-identification {metric}")
    ax.set_title(f"{name}: every attack x protocol", fontsize=9)
    ax.set_ylim(0, 1.3)  # headroom for the legend above the bars
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    _save(fig, path)
    plt.close(fig)


def plot_privacy_utility(results: dict[str, Any], path: Path, key: str = "full-ref/exclude-source") -> None:
    """Privacy-utility across anonymizers: utility (SSIM to the original) against the worst case over
    attacks (chance-normalized top-1); the most useful private anonymizer sits bottom right."""
    from anonrisk.report.card import worst_case

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, card in results.items():
        w, util = worst_case(card, key), card.get("utility")
        if not w or not util:
            continue
        m = w["metric"]
        scale = 1 - m["chance"]
        lo, hi = ((x - m["chance"]) / scale for x in m["ci95"]) if m["ci95"][0] == m["ci95"][0] else (m["normalized"],) * 2
        ax.errorbar(util["ssim"], m["normalized"], yerr=[[max(0, m["normalized"] - lo)], [max(0, hi - m["normalized"])]], fmt="o", capsize=3)
        ax.annotate(f"{name} ({w['attack']})", (util["ssim"], m["normalized"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="k", ls="--", lw=1)
    ax.set_xlabel("utility: SSIM of anonymized to original")
    ax.set_ylabel(f"worst-case re-identification\n(chance-normalized top-1, {key})")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.1, 1.05)
    _save(fig, path)
    plt.close(fig)


def plot_leakage_vs_reid(results: dict[str, Any], path: Path, key: str = "full-ref/exclude-source") -> None:
    """Edge leakage against the worst case over attacks."""
    from anonrisk.report.card import worst_case

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, card in results.items():
        w = worst_case(card, key)
        if "leakage" not in card or not w:
            continue
        v = w["metric"]
        ax.errorbar(card["leakage"]["edge_ssim"], v["value"], yerr=_err(v), fmt="o", capsize=3)
        ax.annotate(name, (card["leakage"]["edge_ssim"], v["value"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("edge SSIM (original vs anonymized)")
    ax.set_ylabel(f"worst-case top-1 ({key})")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.02, 1.05)
    _save(fig, path)
    plt.close(fig)


def plot_sweep(sweep: dict[str, Any], path: Path, key: str = "full-ref/exclude-source", linkage: str = "full-ref/linkage") -> None:
    """Top-1 per attack (exclude-source solid with its interval, linkage dashed) and edge leakage (right axis)
    against the swept parameter."""
    plt = _plt()
    points = sweep["points"]
    xs = [float(p["value"]) for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    attacks = list(dict.fromkeys(a for p in points for a in p["attacks"]))
    chance = None
    for a in attacks:
        ms = [p["attacks"].get(a, {}).get(key) for p in points]
        if not all(ms):
            continue
        chance = ms[0]["chance"]
        line = ax.plot(xs, [m["value"] for m in ms], "o-", label=f"{a}")[0]
        lo_hi = np.array([m["ci95"] for m in ms], dtype=float)
        if np.isfinite(lo_hi).all():
            ax.fill_between(xs, lo_hi[:, 0], lo_hi[:, 1], color=line.get_color(), alpha=0.15)
        lk = [p["attacks"][a].get(linkage) for p in points]
        if all(lk):
            ax.plot(xs, [m["value"] for m in lk], "--", color=line.get_color(), lw=1, label=f"{a} (linkage)")
    if chance is not None:
        ax.axhline(chance, color="k", ls=":", lw=1, label="chance")
    ax.set_xlabel(f"{sweep['base']}: {sweep['param']}")
    ax.set_ylabel(f"top-1 re-identification ({key})")
    ax.set_ylim(0, 1.05)
    if all(p["leakage"] for p in points):
        ax2 = ax.twinx()
        ax2.plot(xs, [p["leakage"]["edge_ssim"] for p in points], "s-", color="grey", alpha=0.7, label="edge SSIM")
        ax2.plot(xs, [p["leakage"]["edge_f"] for p in points], "^-", color="silver", alpha=0.7, label="edge F")
        ax2.set_ylabel("edge leakage")
        ax2.set_ylim(0, 1.05)
        ax2.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.12, 0.0))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.12, 1.0))  # outside: the curves start top left
    ax.set_title(sweep["name"], fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_samples(name: str, rows: list[list[tuple[Any, Any]]], path: Path, note: str = "") -> None:
    """What an anonymizer does to a face: one row per test identity, each image as (original, anonymized)
    side by side, or the anonymized image alone where the original is None."""
    plt = _plt()
    with_originals = any(orig is not None for row in rows for orig, _ in row)
    per_image = 2 if with_originals else 1
    n_cols = max(len(row) for row in rows) * per_image
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.1 * n_cols, 1.15 * len(rows) + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, row in enumerate(rows):
        for j, (orig, anon) in enumerate(row):
            shown = [("original", orig), ("anonymized", anon)] if with_originals else [("anonymized", anon)]
            for k, (label, img) in enumerate(shown):
                ax = axes[i, j * per_image + k]
                if img is not None:
                    ax.imshow(img)
                if i == 0:
                    ax.set_title(label, fontsize=7)
        axes[i, 0].text(-0.08, 0.5, f"identity {i + 1}", transform=axes[i, 0].transAxes, rotation=90, ha="right", va="center", fontsize=7)
    fig.suptitle(f"{name}: test identities" + (f" ({note})" if note else ""), fontsize=9)
    _save(fig, path)
    plt.close(fig)
