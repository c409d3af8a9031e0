"""1:1 verification with the same attacks, as face recognition reports it: ROC and TAR at fixed FAR.

Pairs come from one attack's probes x gallery similarity. A genuine pair is a probe and a gallery image of
its identity (in ``exclude-source`` mode not its own original: cross-image verification; in ``linkage``
mode its own original too); an impostor pair is a probe and an image of another identity. All impostor
pairs are used unless ``impostors_per_probe`` subsamples them (seeded; bounds memory at scale).

A pair is accepted when its score is >= the threshold. ROC: for each distinct score as the threshold (from
the highest down, after the (0, 0) point of an infinite threshold), FAR = accepted impostors / impostors
and TAR = accepted genuine / genuine, as ``sklearn.metrics.roc_curve`` computes it. TAR@FAR f is the
highest TAR among thresholds whose FAR <= f (no interpolation); it is only resolved when there are at least
1/f impostor pairs (``resolved``). 95 % intervals: percentile bootstrap that resamples probe identities with
replacement (every pair weighted by how often its probe's identity was drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from anonrisk.evaluate.protocols import RowSimilarity, as_row_function


@dataclass
class VerificationPairs:
    genuine: np.ndarray  # scores of genuine pairs
    genuine_identity: np.ndarray  # the probe's identity of each genuine pair (bootstrap groups)
    impostor: np.ndarray
    impostor_identity: np.ndarray


def verification_pairs(
    sim: Union[torch.Tensor, RowSimilarity],
    probe_identity: np.ndarray,
    probe_source: np.ndarray,
    gallery_identity: np.ndarray,
    mode: str = "exclude-source",
    impostors_per_probe: Optional[int] = None,
    seed: int = 0,
    block_elems: int = 1 << 24,
) -> VerificationPairs:
    """Genuine and impostor pair scores of a similarity (a matrix or a function of probe rows)."""
    if mode not in ("exclude-source", "linkage"):
        raise ValueError(f"mode must be 'exclude-source' or 'linkage', got {mode!r}")
    probe_identity, probe_source, gallery_identity = map(np.asarray, (probe_identity, probe_source, gallery_identity))
    rows_of = as_row_function(sim)
    n_gal = len(gallery_identity)
    rng = np.random.default_rng([seed, 2])
    gen, gen_id, imp, imp_id = [], [], [], []
    step = max(1, block_elems // max(1, n_gal))
    for start in range(0, len(probe_identity), step):
        rows = np.arange(start, min(start + step, len(probe_identity)))
        block = rows_of(rows).detach().float().cpu().numpy()
        same = probe_identity[rows][:, None] == gallery_identity[None, :]
        genuine = same.copy()
        if mode == "exclude-source":
            genuine[np.arange(len(rows)), probe_source[rows]] = False
        gen.append(block[genuine])
        gen_id.append(np.repeat(probe_identity[rows], genuine.sum(1)))
        if impostors_per_probe is None:
            imp.append(block[~same])
            imp_id.append(np.repeat(probe_identity[rows], (~same).sum(1)))
            continue
        for j, p in enumerate(rows):
            cols = np.flatnonzero(~same[j])
            pick = cols if len(cols) <= impostors_per_probe else rng.choice(cols, impostors_per_probe, replace=False)
            imp.append(block[j, pick])
            imp_id.append(np.full(len(pick), probe_identity[p]))
    return VerificationPairs(np.concatenate(gen), np.concatenate(gen_id), np.concatenate(imp), np.concatenate(imp_id))


def _curve(scores: np.ndarray, is_genuine: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) at every distinct score, highest first, after the (0, 0) point."""
    order = np.argsort(-scores, kind="stable")
    s, g, w = scores[order], is_genuine[order], weights[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each group of tied scores
    tp, fp = np.cumsum(w * g)[last], np.cumsum(w * ~g)[last]
    far = np.r_[0.0, fp / max(fp[-1], 1e-300)]
    tar = np.r_[0.0, tp / max(tp[-1], 1e-300)]
    return far, tar, np.r_[np.inf, s[last]]


def roc(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FAR, TAR, thresholds) of genuine and impostor scores (see the module doc)."""
    scores = np.concatenate([genuine, impostor]).astype(np.float64)
    labels = np.r_[np.ones(len(genuine), bool), np.zeros(len(impostor), bool)]
    return _curve(scores, labels, np.ones(len(scores)))


def tar_at_far(far: np.ndarray, tar: np.ndarray, target: float) -> float:
    return float(tar[far <= target].max())


def verification_summary(pairs: VerificationPairs, fars: Sequence[float] = (1e-3, 1e-4), bootstrap: int = 1000,
                         seed: int = 0, roc_points: int = 200) -> dict:
    """TAR at each FAR with 95 % bootstrap intervals by identity, the equal error rate, and the ROC
    (``roc_points`` points at log-spaced FAR, for plotting)."""
    if not len(pairs.genuine) or not len(pairs.impostor):
        raise ValueError(f"verification needs genuine and impostor pairs (got {len(pairs.genuine)} and {len(pairs.impostor)})")
    scores = np.concatenate([pairs.genuine, pairs.impostor]).astype(np.float64)
    labels = np.r_[np.ones(len(pairs.genuine), bool), np.zeros(len(pairs.impostor), bool)]
    groups = np.concatenate([pairs.genuine_identity, pairs.impostor_identity])
    uniq, inv = np.unique(groups, return_inverse=True)
    far, tar, thr = _curve(scores, labels, np.ones(len(scores)))
    out: dict = {"n_genuine": int(len(pairs.genuine)), "n_impostor": int(len(pairs.impostor)), "n_identities": int(len(uniq))}
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=bootstrap) if bootstrap > 0 else np.zeros((0, len(uniq)))
    boot = np.array([[tar_at_far(*_curve(scores, labels, d[inv].astype(np.float64))[:2], f) for f in fars] for d in draws]).reshape(-1, len(fars))
    out["tar_at_far"] = {}
    for j, f in enumerate(fars):
        lo, hi = np.percentile(boot[:, j], [2.5, 97.5]) if bootstrap > 0 else (float("nan"), float("nan"))
        out["tar_at_far"][f"{f:g}"] = {"far": f, "value": tar_at_far(far, tar, f), "ci95": [float(lo), float(hi)],
                                       "resolved": bool(len(pairs.impostor) * f >= 1)}
    i = int(np.argmin(np.maximum(far, 1 - tar)))
    out["eer"] = float((far[i] + 1 - tar[i]) / 2)
    grid = np.unique(np.clip(np.logspace(np.log10(max(1.0 / len(pairs.impostor), 1e-8)), 0, roc_points), 0, 1))
    out["roc"] = {"far": grid.tolist(), "tar": [tar_at_far(far, tar, f) for f in grid]}
    return out
