"""Re-identification protocols over a probes x gallery similarity matrix.

Probes are anonymized test images; the gallery holds the originals of the test identities. For each probe
every candidate identity gets a score, the max (or mean) similarity over that identity's references, and
the probe's rank is the position of its true identity (ties broken at random, seeded).

References per identity (``PROTOCOL_VERSION`` 2):
- full-ref: every one of the identity's gallery images; few-ref: the first k of a seeded order; single-ref:
  k = 1.
- exclude-source mode: the probe's own original is never a reference (cross-image identification).
- linkage mode: the probe's own original is always among its identity's references (for few-ref and
  single-ref k includes it: the source plus the first k - 1 others; for full-ref, the source plus all others).
Pool: ``pool_size`` identities drawn with the seed; probes and gallery restricted to them.

Randomness, so that an independent scorer can reproduce every rank: ``rng = default_rng([seed, RNG_SALT])``
draws the pool first (``rng.choice(sorted ids, pool_size, replace=False)``, sorted; only when the pool is
smaller than the identities), then one ``rng.permutation`` of each pool identity's gallery indices, in
increasing identity order (the "seeded order"). Scores are float64 (a mean is the float64 sum over the
references divided by their count). A probe's rank is 1 + (other pool identities scoring higher) + a tie-break
uniform in 0..(those scoring equal), drawn for all probes in probe order from
``default_rng([seed, RNG_SALT, 1]).integers(0, ties + 1)``.

Versions: 2 fixed full-ref/linkage, which dropped each identity's last reference in v1; every other
protocol x mode gives the same ranks as v1 (the random streams are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROTOCOL_VERSION = 2
#: seeds the random streams; v1's value, kept so that the v2 fix changes nothing but full-ref/linkage
RNG_SALT = 1


@dataclass
class ProtocolResult:
    ranks: np.ndarray  # (P,) 1-based rank of the true identity per probe
    probe_identity: np.ndarray  # (P,) identity index per probe (for bootstrap by identity)
    pool: int


def _ref_k(protocol: str, k: int) -> int | None:
    return {"full-ref": None, "few-ref": k, "single-ref": 1}[protocol]


def score_protocol(
    sim: torch.Tensor,
    probe_identity: np.ndarray,
    probe_source: np.ndarray,
    gallery_identity: np.ndarray,
    protocol: str,
    mode: str,
    k: int = 5,
    pool_size: int | str = "all",
    score: str = "max",
    seed: int = 0,
    chunk: int = 4096,
) -> ProtocolResult:
    """``sim[p, g]``: similarity of probe p and gallery image g; ``probe_source[p]``: the gallery index of
    probe p's original; identities are small non-negative ints."""
    rng = np.random.default_rng([seed, RNG_SALT])
    n_ids = int(gallery_identity.max()) + 1
    ids = np.unique(gallery_identity)
    if pool_size != "all" and pool_size < len(ids):
        ids = np.sort(rng.choice(ids, int(pool_size), replace=False))
    in_pool = np.zeros(n_ids, bool)
    in_pool[ids] = True

    # a seeded order of each identity's gallery images; references are taken from its front
    order = {i: rng.permutation(np.flatnonzero(gallery_identity == i)) for i in ids}
    ref_k = _ref_k(protocol, k)
    other_refs = np.concatenate([order[i] if ref_k is None else order[i][:ref_k] for i in ids])

    probes = np.flatnonzero(in_pool[probe_identity])
    sim_other = sim[:, torch.as_tensor(other_refs)]
    col_ident = torch.as_tensor(gallery_identity[other_refs])
    ranks = np.empty(len(probes), np.int64)
    tie_rng = np.random.default_rng([seed, RNG_SALT, 1])
    for start in range(0, len(probes), chunk):
        rows = probes[start : start + chunk]
        s = sim_other[torch.as_tensor(rows)].double()
        reduce = "amax" if score == "max" else "mean"
        scores = torch.full((len(rows), n_ids), float("-inf"), dtype=torch.float64)
        scores = scores.scatter_reduce(1, col_ident.expand(len(rows), -1), s, reduce=reduce, include_self=False)
        own = np.empty(len(rows), np.float64)
        for j, p in enumerate(rows):
            ident, src = probe_identity[p], probe_source[p]
            others = order[ident][order[ident] != src]
            if mode == "exclude-source":
                refs = others if ref_k is None else others[:ref_k]
            else:  # linkage: the source plus every other (full-ref) or plus the first k - 1 others
                refs = np.concatenate([[src], others if ref_k is None else others[: ref_k - 1]])
            vals = sim[p, torch.as_tensor(refs)].double()
            own[j] = (vals.max() if score == "max" else vals.mean()).item()
        sc = scores.numpy().astype(np.float64)
        sc[np.arange(len(rows)), probe_identity[rows]] = -np.inf  # compare against the other identities
        sc[:, ~in_pool] = -np.inf
        greater = (sc > own[:, None]).sum(1)
        ties = (sc == own[:, None]).sum(1)
        ranks[start : start + len(rows)] = 1 + greater + tie_rng.integers(0, ties + 1)
    return ProtocolResult(ranks=ranks, probe_identity=probe_identity[probes], pool=len(ids))
