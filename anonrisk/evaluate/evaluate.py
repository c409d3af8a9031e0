"""The evaluate stage: embed test probes (anonymized) and gallery (originals), score every protocol x mode,
measure leakage; writes ``metrics.json`` into its fingerprinted directory."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from anonrisk.config.schema import EvaluateConfig
from anonrisk.data.io import load_image
from anonrisk.data.records import FaceRecord
from anonrisk.evaluate.embed import embed_records, identity_indices
from anonrisk.evaluate.leakage import leakage_summary
from anonrisk.evaluate.metrics import summarize
from anonrisk.evaluate.protocols import PROTOCOL_VERSION, score_protocol
from anonrisk.stages import StageDir, fingerprint, read_json, write_json

EVAL_VERSION = 1


def eval_fingerprint(cfg: EvaluateConfig, upstream: str) -> str:
    return fingerprint("evaluate", EVAL_VERSION, PROTOCOL_VERSION, cfg.model_dump(), upstream)


def score_similarity(sim: torch.Tensor, probes: Sequence[FaceRecord], gallery: Sequence[FaceRecord], cfg: EvaluateConfig) -> dict:
    """Every protocol x mode of one similarity matrix (probes x gallery; probe ids match gallery ids)."""
    g_ident, names = identity_indices(gallery)
    index = {n: i for i, n in enumerate(names)}
    p_ident = np.array([index[r.identity] for r in probes])
    g_pos = {r.id: i for i, r in enumerate(gallery)}
    p_src = np.array([g_pos[r.id] for r in probes])
    out = {}
    for protocol in cfg.protocols:
        for mode in cfg.modes:
            res = score_protocol(sim, p_ident, p_src, g_ident, protocol, mode, cfg.few_ref_k, cfg.pool_size, cfg.score, cfg.seed)
            out[f"{protocol}/{mode}"] = summarize(res, cfg.bootstrap, cfg.seed)
    return out


def evaluate_attack(
    model,
    anonymized: Sequence[FaceRecord],
    originals: Sequence[FaceRecord],
    image_size: int,
    cfg: EvaluateConfig,
    stage: StageDir,
    device: str = "cpu",
) -> dict:
    if stage.is_done():
        return read_json(stage / "metrics.json")
    stage.begin({"evaluate": cfg.model_dump()})
    gallery = sorted((r for r in originals if r.split == "test"), key=lambda r: r.id)
    probes = sorted((r for r in anonymized if r.split == "test"), key=lambda r: r.id)
    model.eval()
    sim = embed_records(model, probes, image_size, device) @ embed_records(model, gallery, image_size, device).t()
    metrics = {"protocol_version": PROTOCOL_VERSION, "protocols": score_similarity(sim, probes, gallery, cfg)}
    if cfg.leakage:
        pairs = ((load_image(g.path, image_size), load_image(p.path, image_size)) for g, p in zip(gallery, probes))
        metrics["leakage"] = leakage_summary(pairs, cfg.leakage_tolerance)
    write_json(stage / "metrics.json", metrics)
    stage.mark_done({"probes": len(probes), "gallery": len(gallery)})
    return metrics
