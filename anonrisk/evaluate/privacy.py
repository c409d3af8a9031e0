"""The privacy measures beside re-identification, from the same similarity (pure functions of it):

- ``verification``: 1:1 verification (the first mode, or every mode), TAR at ``evaluate.verification.fars``
  with 95 % intervals by identity and the EER (``verification.verification_summary``; impostor pairs
  subsampled per probe by default, since its bootstrap re-sorts every pair per draw; ROC points kept);
- ``anonymity``: the effective anonymity set (entropy and rank sets) of the full-reference protocol per
  mode (``anonymity.anonymity_summary``; per-probe lists dropped);
- ``verbatim``: the share of pixels copied unchanged from the original (``audit.verbatim_copy_audit``; the
  quality stage's, since it needs the images, not the similarity).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from anonrisk.config.schema import VerificationConfig
from anonrisk.evaluate.anonymity import anonymity_summary
from anonrisk.evaluate.audit import verbatim_copy_audit
from anonrisk.evaluate.protocols import score_protocols
from anonrisk.evaluate.verification import verification_pairs, verification_summary


def privacy_measures(sim, p_ident: np.ndarray, p_src: np.ndarray, g_ident: np.ndarray, modes: Sequence[str],
                     verification: Optional[VerificationConfig], anonymity: bool, seed: int) -> dict:
    """{"verification": {mode: ...}, "anonymity": {"full-ref/<mode>": ...}} of one probes x gallery similarity."""
    out: dict = {}
    if verification is not None and verification.enabled:
        out["verification"] = {}
        for mode in modes if verification.all_modes else modes[:1]:
            pairs = verification_pairs(sim, p_ident, p_src, g_ident, mode, verification.impostors_per_probe, seed)
            if len(pairs.genuine) and len(pairs.impostor):
                out["verification"][mode] = verification_summary(pairs, verification.fars, verification.bootstrap, seed)
    if not anonymity:
        return out
    out["anonymity"] = {}
    kept = score_protocols(sim, p_ident, p_src, g_ident, ["full-ref"], list(modes), seed=seed, keep_scores=True)
    for key, res in kept.items():
        if res.scores is not None and len(res.scores):
            summary = anonymity_summary(res)
            summary.pop("per_probe", None)
            out["anonymity"][key] = summary
    return out


def verbatim_summary(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """The verbatim-copy audit without its per-image lists (what metrics.json keeps)."""
    out = verbatim_copy_audit(pairs)
    out.pop("per_image", None)
    out.pop("per_face", None)
    return out
