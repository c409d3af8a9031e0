"""Protocol scoring on similarity matrices with known answers."""

import numpy as np
import torch

from anonrisk.config.schema import EvaluateConfig
from anonrisk.data.records import FaceRecord
from anonrisk.evaluate.evaluate import score_similarity
from anonrisk.evaluate.metrics import bootstrap_ci, chance_mrr


def records(n_ids, per):
    return [FaceRecord(f"{i}_{j}", f"id{i}", "", "test") for i in range(n_ids) for j in range(per)]


def score(sim, recs, **kw):
    cfg = EvaluateConfig(bootstrap=200, **kw)
    return score_similarity(torch.as_tensor(sim, dtype=torch.float32), recs, recs, cfg)


def test_identity_embeddings_are_perfect_in_every_protocol():
    recs = records(10, 4)
    ident = np.array([int(r.identity[2:]) for r in recs])
    sim = (ident[:, None] == ident[None, :]).astype(float) + 0.01 * np.random.default_rng(0).random((40, 40))
    out = score(sim, recs)
    for key, m in out.items():
        assert m["top1"]["value"] == 1.0, key
        assert m["mrr"]["value"] == 1.0 and m["top1"]["normalized"] == 1.0


def test_source_only_similarity_separates_linkage_from_exclude_source():
    """An encoder that recognises only the exact source image: linkage 1.0, exclude-source at chance."""
    recs = records(20, 5)
    rng = np.random.default_rng(0)
    sim = np.eye(100) + 0.01 * rng.random((100, 100))
    out = score(sim, recs)
    assert out["full-ref/linkage"]["top1"]["value"] == 1.0
    assert out["single-ref/linkage"]["top1"]["value"] == 1.0
    excl = out["full-ref/exclude-source"]["top1"]
    assert excl["ci95"][0] <= excl["chance"] <= excl["ci95"][1] or excl["value"] < 0.15


def test_random_similarity_is_at_chance_within_the_interval():
    recs = records(50, 6)
    sim = np.random.default_rng(3).random((300, 300))
    out = score(sim, recs, protocols=["full-ref"], modes=["exclude-source"])
    m = out["full-ref/exclude-source"]
    assert m["top1"]["chance"] == 1 / 50 and m["top5"]["chance"] == 5 / 50
    assert m["top5"]["ci95"][0] <= 0.1 <= m["top5"]["ci95"][1]
    assert abs(m["mrr"]["chance"] - chance_mrr(50)) < 1e-12


def test_pool_size_restricts_candidates_and_chance():
    recs = records(30, 3)
    sim = np.random.default_rng(0).random((90, 90))
    m = score(sim, recs, pool_size=10)["full-ref/exclude-source"]
    assert m["pool"] == 10 and m["n_probes"] == 30 and m["top1"]["chance"] == 0.1


def test_reference_count_decides_whether_the_one_telling_image_is_seen():
    """Only image 4 of each identity resembles the others. Full-ref (and few-ref with k = 4, all non-source
    images) always has it among the references unless it is the probe's own source; single-ref has it
    with probability 1/4."""
    recs = records(40, 5)
    rng = np.random.default_rng(0)
    sim = 0.01 * rng.random((200, 200))
    for p in range(200):
        ident, j = divmod(p, 5)
        if j != 4:
            sim[p, ident * 5 + 4] = 1.0
    out = score(sim, recs, protocols=["full-ref", "few-ref", "single-ref"], modes=["exclude-source"], few_ref_k=4)
    full = out["full-ref/exclude-source"]["top1"]["value"]
    assert full >= 0.8
    assert out["few-ref/exclude-source"]["top1"]["value"] == full
    assert 0.1 < out["single-ref/exclude-source"]["top1"]["value"] < 0.45


def test_bootstrap_interval_resamples_identities():
    per_probe = np.array([1.0] * 10 + [0.0] * 10)
    groups = np.repeat(np.arange(2), 10)  # two identities: all right, all wrong
    lo, hi = bootstrap_ci(per_probe, groups, 500, 0)
    assert lo == 0.0 and hi == 1.0  # resampling whole identities spans both extremes


def streaming_problem(seed, n_ids=15, ties=None):
    rng = np.random.default_rng(seed)
    g_ident = np.repeat(np.arange(n_ids), rng.integers(2, 7, n_ids))
    rng.shuffle(g_ident)
    emb = torch.nn.functional.normalize(torch.randn(len(g_ident), 8, generator=torch.Generator().manual_seed(seed)), dim=1)
    centre = torch.nn.functional.normalize(torch.randn(n_ids, 8, generator=torch.Generator().manual_seed(seed + 1)), dim=1)
    probes = torch.nn.functional.normalize(emb + 0.8 * centre[torch.as_tensor(g_ident)], dim=1)
    sim = probes @ emb.t()
    if ties:
        sim = (sim * ties).round() / ties
    return sim, probes, emb, g_ident


def test_streaming_scorer_equals_the_materialised_scorer_for_every_protocol_mode_and_score():
    """Blocks of 1..7 probe rows (ragged), against the v2 materialised scorer with its own row chunks. Exact."""
    from anonrisk.evaluate.protocols import score_protocols
    from anonrisk.evaluate.protocols_reference import score_protocol_materialised

    for seed, ties, pool in [(0, None, "all"), (1, 4, "all"), (2, 3, 6), (3, None, 9)]:
        sim, _, _, g_ident = streaming_problem(seed, ties=ties)
        src = np.arange(len(g_ident))
        for score_kind in ("max", "mean"):
            for block in (1, 3 * len(g_ident), 7 * len(g_ident)):
                got = score_protocols(sim, g_ident, src, g_ident, k=3, pool_size=pool, score=score_kind, seed=seed,
                                      block_elems=block)
                for key, res in got.items():
                    protocol, mode = key.split("/")
                    want = score_protocol_materialised(sim, g_ident, src, g_ident, protocol, mode, 3, pool, score_kind, seed, chunk=5)
                    assert np.array_equal(res.ranks, want.ranks), (seed, score_kind, block, key)
                    assert np.array_equal(res.probe_identity, want.probe_identity) and res.pool == want.pool


def test_a_similarity_function_of_embeddings_equals_the_matrix_and_keeps_identity_scores():
    from anonrisk.evaluate.protocols import EmbeddingSimilarity, score_protocols

    sim, probes, gallery, g_ident = streaming_problem(5)
    src = np.arange(len(g_ident))
    from_matrix = score_protocols(sim, g_ident, src, g_ident, keep_scores=True)
    from_embeddings = score_protocols(EmbeddingSimilarity(probes, gallery, "cpu"), g_ident, src, g_ident,
                                      keep_scores=True, block_elems=4 * len(g_ident))
    for key, res in from_matrix.items():
        other = from_embeddings[key]
        assert np.array_equal(res.ranks, other.ranks) and np.allclose(res.scores, other.scores)
        # the kept scores give the ranks back: own identity's column against the others (no ties here)
        own_col = np.searchsorted(res.pool_ids, res.probe_identity)
        own = res.scores[np.arange(len(own_col)), own_col]
        assert np.array_equal(1 + (res.scores > own[:, None]).sum(1), res.ranks), key


def test_probes_without_an_own_reference_are_left_out_and_counted():
    from anonrisk.evaluate.protocols import score_protocols

    g_ident = np.array([0, 1, 1, 2, 2, 2])  # identity 0 has only the probe's own source
    sim = torch.rand(6, 6, generator=torch.Generator().manual_seed(0))
    out = score_protocols(sim, g_ident, np.arange(6), g_ident)
    assert out["full-ref/exclude-source"].unscored == 1 and 0 not in out["full-ref/exclude-source"].probe_identity
    assert out["full-ref/linkage"].unscored == 0 and len(out["full-ref/linkage"].ranks) == 6
