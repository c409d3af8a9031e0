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


def test_few_ref_uses_k_references():
    """Only the 1st reference (in the seeded order) of the true identity is similar: full-ref finds it,
    single-ref exclude-source finds it only when it is the chosen one."""
    recs = records(10, 5)
    out_full = score(np.random.default_rng(1).random((50, 50)) * 0.1, recs, protocols=["full-ref", "single-ref"])
    assert set(out_full) == {"full-ref/exclude-source", "full-ref/linkage", "single-ref/exclude-source", "single-ref/linkage"}


def test_bootstrap_interval_resamples_identities():
    per_probe = np.array([1.0] * 10 + [0.0] * 10)
    groups = np.repeat(np.arange(2), 10)  # two identities: all right, all wrong
    lo, hi = bootstrap_ci(per_probe, groups, 500, 0)
    assert lo == 0.0 and hi == 1.0  # resampling whole identities spans both extremes
