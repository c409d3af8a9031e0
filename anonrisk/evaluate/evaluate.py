"""The evaluate stages. Per (anonymizer, attack): the attack's probes x gallery similarity scored for every
protocol x mode (``metrics.json``). Per anonymizer: the ``quality`` stage, structure leakage and utility of
the anonymized test images against their originals, whatever the attack. Their directories come from the
plan (``anonrisk.plan``), whose fingerprints use the versions below."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from anonrisk.config.schema import EvaluateConfig
from anonrisk.data.io import load_image
from anonrisk.data.records import FaceRecord
from anonrisk.evaluate.leakage import leakage_summary
from anonrisk.evaluate.metrics import summarize
from anonrisk.evaluate.protocols import PROTOCOL_VERSION, score_protocols
from anonrisk.stages import StageDir, read_json, write_json

EVAL_VERSION = 3  # 2: leakage and utility moved to the quality stage; 3: verification and anonymity sets
QUALITY_VERSION = 3  # 2: Gaussian SSIM, PSNR of identical pairs counted (not capped), FID Inception features; 3: verbatim audit
#: EvaluateConfig keys that only the quality stage reads
QUALITY_KEYS = ("leakage", "leakage_tolerance", "utility", "verbatim")


def identity_indices(records: Sequence[FaceRecord]) -> tuple[np.ndarray, list[str]]:
    names = sorted({r.identity for r in records})
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[r.identity] for r in records]), names


def probes_and_gallery(anonymized: Sequence[FaceRecord], originals: Sequence[FaceRecord]) -> tuple[list[FaceRecord], list[FaceRecord]]:
    """(probes, gallery): the anonymized and the original test images, both sorted by record id."""
    gallery = sorted((r for r in originals if r.split == "test"), key=lambda r: r.id)
    probes = sorted((r for r in anonymized if r.split == "test"), key=lambda r: r.id)
    return probes, gallery


def evaluate_similarity(sim_fn, probes: Sequence[FaceRecord], gallery: Sequence[FaceRecord], cfg: EvaluateConfig, stage: StageDir, begin: dict) -> dict:
    """Run (or reuse) one attack's evaluate stage: ``sim_fn(probes, gallery)`` gives the similarity matrix."""
    if stage.is_done():
        return read_json(stage / "metrics.json")
    stage.begin(begin)
    sim = sim_fn(probes, gallery)
    if tuple(sim.shape) != (len(probes), len(gallery)):
        raise RuntimeError(f"{stage}: similarity has shape {tuple(sim.shape)}, expected {(len(probes), len(gallery))}")
    metrics = {"protocol_version": PROTOCOL_VERSION, "protocols": score_similarity(sim, probes, gallery, cfg)}
    metrics.update(similarity_privacy(sim, probes, gallery, cfg))
    write_json(stage / "metrics.json", metrics)
    stage.mark_done({"probes": len(probes), "gallery": len(gallery)})
    return metrics


def measure_quality(anonymized: Sequence[FaceRecord], originals: Sequence[FaceRecord], image_size: int, cfg: EvaluateConfig, stage: StageDir) -> dict:
    """Leakage and utility of the anonymized test images against their originals (``quality.json``)."""
    if stage.is_done():
        return read_json(stage / "quality.json")
    from anonrisk.evaluate.utility import utility_summary

    stage.begin({"evaluate": cfg.model_dump(include=set(QUALITY_KEYS))})
    probes, gallery = probes_and_gallery(anonymized, originals)
    by_id = {g.id: g for g in gallery}
    gallery = [by_id[p.id] for p in probes]  # each probe with its own original (records left out have no probe)
    out: dict = {}
    if cfg.leakage:
        pairs = ((load_image(g.path, image_size), load_image(p.path, image_size)) for g, p in zip(gallery, probes))
        out["leakage"] = leakage_summary(pairs, cfg.leakage_tolerance)
    if cfg.utility.enabled:
        pairs = ((load_image(g.path, image_size), load_image(p.path, image_size)) for g, p in zip(gallery, probes))
        out["utility"] = utility_summary(pairs, cfg.utility)
    if cfg.verbatim:
        from anonrisk.evaluate.privacy import verbatim_summary

        pairs = ((load_image(g.path, image_size), load_image(p.path, image_size)) for g, p in zip(gallery, probes))
        out["verbatim"] = verbatim_summary(pairs)
    write_json(stage / "quality.json", out)
    stage.mark_done({"pairs": len(probes)})
    return out


def _indices(probes: Sequence[FaceRecord], gallery: Sequence[FaceRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probe identity, probe's own original in the gallery, gallery identity) as integer arrays."""
    g_ident, names = identity_indices(gallery)
    index = {n: i for i, n in enumerate(names)}
    g_pos = {r.id: i for i, r in enumerate(gallery)}
    return np.array([index[r.identity] for r in probes]), np.array([g_pos[r.id] for r in probes]), g_ident


def similarity_privacy(sim, probes: Sequence[FaceRecord], gallery: Sequence[FaceRecord], cfg: EvaluateConfig) -> dict:
    """Verification (TAR@FAR with intervals) and effective anonymity sets of one similarity."""
    from anonrisk.evaluate.privacy import privacy_measures

    p_ident, p_src, g_ident = _indices(probes, gallery)
    return privacy_measures(sim, p_ident, p_src, g_ident, cfg.modes, cfg.verification, cfg.privacy, cfg.seed)


def score_similarity(sim, probes: Sequence[FaceRecord], gallery: Sequence[FaceRecord], cfg: EvaluateConfig) -> dict:
    """Every protocol x mode of one similarity (probes x gallery; probe ids match gallery ids), in one streaming
    pass: ``sim`` is a matrix or a function of probe rows (``protocols.RowSimilarity``)."""
    g_ident, names = identity_indices(gallery)
    index = {n: i for i, n in enumerate(names)}
    p_ident = np.array([index[r.identity] for r in probes])
    g_pos = {r.id: i for i, r in enumerate(gallery)}
    p_src = np.array([g_pos[r.id] for r in probes])
    results = score_protocols(sim, p_ident, p_src, g_ident, cfg.protocols, cfg.modes, cfg.few_ref_k, cfg.pool_size, cfg.score, cfg.seed)
    return {key: summarize(res, cfg.bootstrap, cfg.seed) for key, res in results.items()}
