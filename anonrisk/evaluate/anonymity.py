"""The effective anonymity set: how many candidates an attacker is effectively left with per probe.

From one attack's identity scores under a protocol (``protocols.score_protocols(..., keep_scores=True)``:
each scored probe's score for every identity of the pool, its own identity's by the protocol's references):

- **entropy set** ``exp(H(p))``, with ``p`` the attacker's distribution over the pool's identities. It is the
  number of equally likely candidates that would leave the attacker as uncertain: 1 when one candidate has
  all the mass, the pool size when scores are flat (a k-anonymity-like figure).
  - ``softmax`` (default): ``p = softmax(s / temperature)``. Similarities are cosines in [-1, 1], and a
    contrastive attacker is trained to read them through exactly this softmax, so the default temperature
    is the contrastive attack's training temperature (0.1, ``attack.temperature``'s default). Lower
    temperatures give smaller sets; pass the attack's own temperature when it differs.
  - ``normalized``: ``p = (s - min s) / sum(s - min s)`` over the pool (no temperature; flat when every
    score is equal). Scale-free but sensitive to the worst candidate.
- **rank set**: the number of candidates scored at least as high as the truth, the truth included
  (``1 + #higher + #tied``): the pool an attacker who checks candidates in score order must go through,
  ties counted against privacy's favour. ``rank set <= k`` is top-k with ties counted as misses.

Summaries: mean, median and quantiles of both sets, the pool size they compare to, and the rank
distribution (counts of rank sets in 1, 2-5, 6-10, 11-50, 51-100, > 100).
"""

from __future__ import annotations

import numpy as np

from anonrisk.evaluate.protocols import ProtocolResult

DEFAULT_TEMPERATURE = 0.1
RANK_BINS = ((1, 1), (2, 5), (6, 10), (11, 50), (51, 100), (101, None))
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def entropy_set(scores: np.ndarray, method: str = "softmax", temperature: float = DEFAULT_TEMPERATURE) -> np.ndarray:
    """exp(entropy) per row of (P, pool) identity scores (see the module doc)."""
    s = np.asarray(scores, np.float64)
    if method == "softmax":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        z = s / temperature
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
    elif method == "normalized":
        shifted = s - s.min(1, keepdims=True)
        total = shifted.sum(1, keepdims=True)
        p = np.where(total > 0, shifted / np.where(total > 0, total, 1), 1.0 / s.shape[1])
    else:
        raise ValueError(f"method must be 'softmax' or 'normalized', got {method!r}")
    logp = np.log(np.where(p > 0, p, 1.0))
    return np.exp(-(p * logp).sum(1))


def rank_set(scores: np.ndarray, truth_column: np.ndarray) -> np.ndarray:
    """Candidates scored at least as high as the truth, the truth included, per row."""
    s = np.asarray(scores)
    own = s[np.arange(len(s)), truth_column]
    return (s >= own[:, None]).sum(1)


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), **{f"q{round(q * 100):02d}": float(np.quantile(x, q)) for q in QUANTILES}}


def anonymity_summary(result: ProtocolResult, method: str = "softmax", temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """Entropy and rank anonymity sets of one protocol x mode result scored with ``keep_scores=True``."""
    if result.scores is None or result.pool_ids is None:
        raise ValueError("anonymity sets need the identity scores: score with keep_scores=True")
    if not len(result.scores):
        raise ValueError("anonymity sets: no scored probes")
    truth = np.searchsorted(result.pool_ids, result.probe_identity)
    ent, ranks = entropy_set(result.scores, method, temperature), rank_set(result.scores, truth)
    hist = {f"{lo}" if lo == hi else (f">{lo - 1}" if hi is None else f"{lo}-{hi}"): int(((ranks >= lo) & ((ranks <= hi) if hi else True)).sum())
            for lo, hi in RANK_BINS}
    return {"pool": result.pool, "n_probes": int(len(ranks)), "method": method,
            "temperature": temperature if method == "softmax" else None,
            "entropy_set": _stats(ent), "rank_set": _stats(ranks.astype(np.float64)), "rank_distribution": hist,
            "per_probe": {"entropy_set": ent.tolist(), "rank_set": ranks.tolist()}}
