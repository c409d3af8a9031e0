"""The materialised scorer of protocol v2, kept as the reference of the streaming scorer in ``protocols``.

It indexes the whole probes x gallery matrix (and copies its reference columns), so its memory is
O(probes x gallery): fine for tests and for the benchmark's reference row, not for 200k images. Same
definition and random streams as ``protocols`` (see its docstring); probes whose identity has no reference
are not supported here.
"""

from __future__ import annotations

import numpy as np
import torch

from anonrisk.evaluate.protocols import RNG_SALT, ProtocolResult


def _ref_k(protocol: str, k: int) -> int | None:
    return {"full-ref": None, "few-ref": k, "single-ref": 1}[protocol]


def score_protocol_materialised(
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
