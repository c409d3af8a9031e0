"""score_protocol against a brute-force scorer written from the protocols module docstring: every protocol x
mode x score, pool sizes, and similarity matrices full of ties. Tolerance: exact (the ranks are integers
and the random tie-breaks are drawn from the same documented stream)."""

import itertools

import numpy as np
import pytest
import torch

from anonrisk.evaluate.protocols import PROTOCOL_VERSION, RNG_SALT, score_protocol


def brute_force(sim, probe_identity, probe_source, gallery_identity, protocol, mode, k, pool_size, score, seed):
    """One probe at a time, one candidate identity at a time, straight from the docstring."""
    rng = np.random.default_rng([seed, RNG_SALT])
    ids = sorted(set(gallery_identity.tolist()))
    if pool_size != "all" and pool_size < len(ids):
        ids = sorted(rng.choice(ids, pool_size, replace=False).tolist())
    order = {i: rng.permutation([g for g in range(len(gallery_identity)) if gallery_identity[g] == i]) for i in ids}
    n_refs = {"full-ref": None, "few-ref": k, "single-ref": 1}[protocol]

    def references(ident, src):
        others = [g for g in order[ident] if g != src]
        if ident != probe_identity_p or mode == "exclude-source":
            return others if n_refs is None else others[:n_refs]
        return [src] + (others if n_refs is None else others[: n_refs - 1])  # linkage: its own original counts

    reduce = max if score == "max" else (lambda v: sum(v) / len(v))
    greater, ties = [], []
    for p in range(len(probe_identity)):
        probe_identity_p = probe_identity[p]
        if probe_identity_p not in ids:
            continue
        scores = {i: reduce([float(sim[p, g]) for g in references(i, probe_source[p])]) for i in ids}
        truth = scores.pop(probe_identity_p)
        greater.append(sum(s > truth for s in scores.values()))
        ties.append(sum(s == truth for s in scores.values()))
    tie_rng = np.random.default_rng([seed, RNG_SALT, 1])
    return 1 + np.array(greater) + tie_rng.integers(0, np.array(ties) + 1)


def problem(seed, n_ids=9, per=(1, 6), tie_levels=None):
    """Identities with 1..6 images each (so references run out), probes = the gallery's anonymized copies."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(per[0], per[1] + 1, n_ids)
    counts[0] = 1  # an identity with its source as its only image: exclude-source has no reference for it
    gallery_identity = np.repeat(np.arange(n_ids), counts)
    rng.shuffle(gallery_identity)
    n = len(gallery_identity)
    sim = rng.random((n, n)) if tie_levels is None else rng.integers(0, tie_levels, (n, n)) / tie_levels
    sim = sim + 0.5 * (gallery_identity[:, None] == gallery_identity[None, :]) * rng.random((n, 1))
    return torch.as_tensor(sim, dtype=torch.float32), gallery_identity.copy(), np.arange(n), gallery_identity


CASES = list(itertools.product(["full-ref", "few-ref", "single-ref"], ["exclude-source", "linkage"], ["max", "mean"]))


@pytest.mark.parametrize("protocol,mode,score", CASES)
def test_score_protocol_equals_the_brute_force_scorer(protocol, mode, score):
    for seed, ties, pool in [(0, None, "all"), (1, 3, "all"), (2, 4, 5), (3, None, 4), (4, 2, "all")]:
        sim, p_ident, p_src, g_ident = problem(seed, tie_levels=ties)
        if mode == "exclude-source":  # a probe whose identity has no other image cannot be scored
            keep = np.array([np.sum(g_ident == i) > 1 for i in p_ident])
            sim, p_ident, p_src = sim[torch.as_tensor(keep)], p_ident[keep], p_src[keep]
        got = score_protocol(sim, p_ident, p_src, g_ident, protocol, mode, k=3, pool_size=pool, score=score, seed=seed)
        want = brute_force(sim.double().numpy().astype(np.float32), p_ident, p_src, g_ident, protocol, mode, 3, pool, score, seed)
        assert np.array_equal(got.ranks, want), (seed, ties, pool, got.ranks, want)


def test_full_ref_linkage_uses_every_reference():
    """Identity 0 has 4 images; only its last-ordered other image resembles the probes. full-ref/linkage must
    see it (v1 dropped each identity's last reference in linkage mode)."""
    g_ident = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    rng = np.random.default_rng([0, RNG_SALT])
    order = rng.permutation(np.flatnonzero(g_ident == 0))
    sim = torch.zeros(1, 8)
    src = int(order[0])
    sim[0, int(order[-1])] = 1.0  # the last of the seeded order: dropped by v1
    sim[0, 4:] = 0.5
    res = score_protocol(sim, np.array([0]), np.array([src]), g_ident, "full-ref", "linkage", score="max", seed=0)
    assert res.ranks.tolist() == [1]
    assert PROTOCOL_VERSION >= 2
