"""Retrieval metrics with chance levels and 95 % bootstrap intervals resampled by identity."""

from __future__ import annotations

import numpy as np

from anonrisk.evaluate.protocols import ProtocolResult


def chance(pool: int, k: int) -> float:
    return min(k, pool) / pool


def chance_mrr(pool: int) -> float:
    return float(np.mean(1.0 / np.arange(1, pool + 1)))


def normalized(acc: float, ch: float) -> float:
    """(acc - chance) / (1 - chance): 0 at chance, 1 at perfect."""
    return (acc - ch) / (1 - ch) if ch < 1 else 0.0


def chance_interval(pool: int, k: int, n_probes: int) -> tuple[float, float]:
    """Central 95 % interval of the accuracy a chance-level attacker gets on ``n_probes`` probes."""
    from scipy.stats import binom

    p = chance(pool, k)
    return float(binom.ppf(0.025, n_probes, p) / n_probes), float(binom.ppf(0.975, n_probes, p) / n_probes)


def bootstrap_ci(per_probe: np.ndarray, groups: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean, resampling whole identities with replacement."""
    if reps <= 0:
        return (float("nan"), float("nan"))
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=per_probe, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=reps)  # (reps, n_ids) counts
    stats = (draws @ sums) / (draws @ counts)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(result: ProtocolResult, bootstrap: int = 1000, seed: int = 0) -> dict:
    r = result.ranks
    per = {"top1": (r <= 1).astype(float), "top5": (r <= 5).astype(float), "mrr": 1.0 / r}
    out: dict = {"n_probes": int(len(r)), "pool": result.pool, "n_identities": int(len(np.unique(result.probe_identity)))}
    if result.unscored:  # exclude-source probes whose identity has no other image
        out["unscored_probes"] = result.unscored
    chances = {"top1": chance(result.pool, 1), "top5": chance(result.pool, 5), "mrr": chance_mrr(result.pool)}
    for name, values in per.items():
        value = float(values.mean())
        lo, hi = bootstrap_ci(values, result.probe_identity, bootstrap, seed)
        out[name] = {"value": value, "ci95": [lo, hi], "chance": chances[name]}
        out[name]["normalized"] = normalized(value, chances[name])
        if name in ("top1", "top5"):
            out[name]["chance_ci95"] = list(chance_interval(result.pool, 1 if name == "top1" else 5, len(r)))
    return out
