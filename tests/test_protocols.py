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
