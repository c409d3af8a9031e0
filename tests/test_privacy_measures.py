"""Privacy measures no peer reports (issue 17 item 6): the verbatim-copy audit, the effective anonymity set,
and 1:1 verification (TAR at FAR with intervals; sklearn's roc_curve as the reference)."""

import numpy as np
import pytest
import torch

from anonrisk.evaluate.anonymity import anonymity_summary, entropy_set, rank_set
from anonrisk.evaluate.audit import copy_fractions, region_mask, verbatim_copy_audit
from anonrisk.evaluate.protocols import score_protocol
from anonrisk.evaluate.verification import roc, tar_at_far, verification_pairs, verification_summary


def faces(n=4, h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# --- verbatim-copy audit -------------------------------------------------------------------------------

def test_identity_reads_one_and_noise_reads_about_zero():
    """With the built-in identity, noise and blur anonymizers (blur: in between, few exact pixels)."""
    from anonrisk.anonymize.classical import BlurAnonymizer, IdentityAnonymizer, NoiseAnonymizer

    x, seeds = faces(), [1, 2, 3, 4]
    ident = verbatim_copy_audit(zip(x, IdentityAnonymizer(IdentityAnonymizer.Params())(x, seeds)))
    assert ident["image"]["mean"] == ident["face"]["mean"] == 1.0 and ident["pasted_faces"] == 1.0
    noise = verbatim_copy_audit(zip(x, NoiseAnonymizer(NoiseAnonymizer.Params())(x, seeds)))
    assert noise["image"]["max"] < 1e-3 and noise["pasted_faces"] == 0.0
    # with a tolerance of 2 levels per channel, independent noise matches about (5 / 256)^3 of the pixels
    assert verbatim_copy_audit(zip(x, NoiseAnonymizer(NoiseAnonymizer.Params())(x, seeds)), tolerance=2)["image"]["mean"] < 1e-3
    blurred = verbatim_copy_audit(zip(x, BlurAnonymizer(BlurAnonymizer.Params(sigma=0.02))(x, seeds)), tolerance=8)
    assert noise["face"]["mean"] < blurred["face"]["mean"] < 1.0


def test_a_pasted_back_face_is_found_in_the_face_region_only():
    x, other = faces(1)[0], faces(1, seed=3)[0]
    face = region_mask(x.shape[:2])
    pasted = np.where(face[..., None], x, other)  # a redraw that pasted the original face back
    image_share, face_share = copy_fractions(x, pasted)
    assert face_share == 1.0 and image_share == pytest.approx(face.mean(), abs=1e-3)
    # a background-only copy: high image share, face ~0
    background = np.where(face[..., None], other, x)
    assert copy_fractions(x, background)[1] < 0.01
    # explicit box (pixels) and mask arguments, and a tolerance catching a re-encoded copy
    assert copy_fractions(x, pasted, box=(20, 15, 30, 25))[1] == 1.0
    assert copy_fractions(x, pasted, mask=~face)[1] < 0.01
    shifted = np.clip(x.astype(int) + 1, 0, 255).astype(np.uint8)
    assert copy_fractions(x, shifted)[0] < 0.05 and copy_fractions(x, shifted, tolerance=1)[0] == 1.0


def test_audit_refuses_mismatched_sizes_and_empty_boxes():
    x = faces(1)[0]
    with pytest.raises(ValueError, match="image shapes differ"):
        copy_fractions(x, x[:-1])
    with pytest.raises(ValueError, match="empty or outside"):
        copy_fractions(x, x, box=(10, 10, 10, 20))
    with pytest.raises(ValueError, match="face mask has shape"):
        copy_fractions(x, x, mask=np.ones((3, 3), bool))


# --- effective anonymity set ---------------------------------------------------------------------------

def test_entropy_set_known_answers():
    flat = np.zeros((1, 50))
    assert entropy_set(flat)[0] == pytest.approx(50) and entropy_set(flat, "normalized")[0] == pytest.approx(50)
    sure = np.full((1, 50), -1.0)
    sure[0, 3] = 1.0
    assert entropy_set(sure, temperature=0.01)[0] == pytest.approx(1.0, abs=1e-6)
    two = np.array([[1.0, 1.0, -1e9]])
    assert entropy_set(two)[0] == pytest.approx(2.0)
    # softmax at temperature T of scores s equals exp(H) computed by hand
    s = np.array([[0.3, 0.1, -0.2, 0.5]])
    p = np.exp(s / 0.1) / np.exp(s / 0.1).sum()
    assert entropy_set(s, temperature=0.1)[0] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    assert rank_set(np.array([[0.5, 0.5, 0.2, 0.9]]), np.array([0]))[0] == 3  # the truth, its tie and 0.9


def identity_similarity(n_ids=20, per=4, strength=1.0, seed=0):
    rng = np.random.default_rng(seed)
    ident = np.repeat(np.arange(n_ids), per)
    sim = rng.normal(0, 0.1, (len(ident), len(ident))) + strength * (ident[:, None] == ident[None, :])
    return torch.as_tensor(sim, dtype=torch.float32), ident


def test_anonymity_sets_shrink_with_a_stronger_attack_and_match_the_ranks():
    sets = {}
    for strength in (0.0, 0.3, 2.0):
        sim, ident = identity_similarity(strength=strength)
        res = score_protocol(sim, ident, np.arange(len(ident)), ident, "full-ref", "exclude-source", keep_scores=True)
        out = anonymity_summary(res)
        sets[strength] = out["entropy_set"]["mean"]
        # the rank set is the rank with ties counted against privacy: equal to the ranks when there are no ties
        assert out["rank_set"]["mean"] == pytest.approx(res.ranks.mean())
        assert sum(out["rank_distribution"].values()) == out["n_probes"] == len(res.ranks)
        if strength == 2.0:
            assert out["rank_distribution"]["1"] == len(res.ranks)
    assert sets[0.0] > 15 and sets[0.0] > sets[0.3] > sets[2.0]  # chance: near the pool size (20)
    assert sets[2.0] < 1.5


def test_anonymity_needs_kept_scores():
    sim, ident = identity_similarity()
    res = score_protocol(sim, ident, np.arange(len(ident)), ident, "single-ref", "linkage")
    with pytest.raises(ValueError, match="keep_scores=True"):
        anonymity_summary(res)


# --- 1:1 verification ----------------------------------------------------------------------------------

def test_tar_at_far_equals_sklearn_roc_curve():
    """Our ROC against sklearn.metrics.roc_curve (drop_intermediate=False) on scores with ties, and TAR@FAR
    as the best TPR with FPR <= FAR on sklearn's curve. Tolerance: exact."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(0)
    for ties in (None, 20):
        gen, imp = rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 40000)
        if ties:
            gen, imp = np.round(gen * ties) / ties, np.round(imp * ties) / ties
        far, tar, thr = roc(gen, imp)
        fpr, tpr, thresholds = roc_curve(np.r_[np.ones(len(gen)), np.zeros(len(imp))], np.r_[gen, imp], drop_intermediate=False)
        assert np.array_equal(far, fpr) and np.array_equal(tar, tpr) and np.array_equal(thr[1:], thresholds[1:])
        for f in (1e-3, 1e-4, 0.05):
            assert tar_at_far(far, tar, f) == tpr[fpr <= f].max()


def test_verification_pairs_and_summary_with_intervals():
    sim, ident = identity_similarity(n_ids=20, per=4, strength=0.25, seed=1)
    src = np.arange(len(ident))
    pairs = verification_pairs(sim, ident, src, ident, "exclude-source", block_elems=7 * len(ident))
    assert len(pairs.genuine) == len(ident) * 3 and len(pairs.impostor) == len(ident) * (len(ident) - 4)
    linkage = verification_pairs(sim, ident, src, ident, "linkage")
    assert len(linkage.genuine) == len(ident) * 4
    out = verification_summary(pairs, bootstrap=200)
    for key in ("0.001", "0.0001"):
        m = out["tar_at_far"][key]
        assert m["ci95"][0] <= m["value"] <= m["ci95"][1] and 0 <= m["value"] <= 1
    assert out["tar_at_far"]["0.001"]["resolved"] and not out["tar_at_far"]["0.0001"]["resolved"]  # 6,080 impostors
    assert out["tar_at_far"]["0.001"]["value"] >= out["tar_at_far"]["0.0001"]["value"]
    assert 0 < out["eer"] < 0.5 and out["roc"]["tar"] == sorted(out["roc"]["tar"])
    # a perfect attacker: every genuine above every impostor
    perfect, _ = identity_similarity(n_ids=20, per=4, strength=5.0, seed=1)
    best = verification_summary(verification_pairs(perfect, ident, src, ident), bootstrap=50)
    assert best["tar_at_far"]["0.0001"]["value"] == 1.0 and best["eer"] == 0.0
    # subsampled impostors: bounded, seeded
    few = verification_pairs(sim, ident, src, ident, impostors_per_probe=10, seed=3)
    again = verification_pairs(sim, ident, src, ident, impostors_per_probe=10, seed=3)
    assert len(few.impostor) == 10 * len(ident) and np.array_equal(few.impostor, again.impostor)
