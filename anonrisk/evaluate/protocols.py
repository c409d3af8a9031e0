"""Re-identification protocols over a probes x gallery similarity matrix.

Probes are anonymized test images; the gallery holds the originals of the test identities. For each probe
every candidate identity gets a score, the max (or mean) similarity over that identity's references, and
the probe's rank is the position of its true identity (ties broken at random, seeded).

References per identity (``PROTOCOL_VERSION`` 2):
- full-ref: every one of the identity's gallery images; few-ref: the first k of a seeded order; single-ref:
  k = 1.
- exclude-source mode: the probe's own original is never a reference (cross-image identification).
- linkage mode: the probe's own original is always among its identity's references (for few-ref and
  single-ref k includes it: the source plus the first k - 1 others; for full-ref, the source plus all others).
Pool: ``pool_size`` identities drawn with the seed; probes and gallery restricted to them.

Randomness, so that an independent scorer can reproduce every rank: ``rng = default_rng([seed, RNG_SALT])``
draws the pool first (``rng.choice(sorted ids, pool_size, replace=False)``, sorted; only when the pool is
smaller than the identities), then one ``rng.permutation`` of each pool identity's gallery indices, in
increasing identity order (the "seeded order"). Scores are float64 (a mean is the float64 sum over the
references divided by their count). A probe's rank is 1 + (other pool identities scoring higher) + a tie-break
uniform in 0..(those scoring equal), drawn for all probes in probe order from
``default_rng([seed, RNG_SALT, 1]).integers(0, ties + 1)``.

Unscorable probes: in exclude-source mode a probe whose identity has no image but its own source has no
reference; it is left out of that result (``ProtocolResult.unscored`` counts it).

Streaming: ``score_protocols`` scores every protocol x mode in one pass over blocks of probe rows. The
similarity is a probes x gallery matrix or a *function* of probe rows returning those rows against every
gallery image (``EmbeddingSimilarity`` computes them from embeddings, on the GPU when there is one), so
memory is one block (``block_elems``) plus O(probes) (plus O(probes x pool identities) only with
``keep_scores``), never O(probes x gallery). It gives the ranks of the materialised scorer
(``protocols_reference``) exactly.

Versions: 2 fixed full-ref/linkage, which dropped each identity's last reference in v1; every other
protocol x mode gives the same ranks as v1 (the random streams are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

PROTOCOL_VERSION = 2
#: seeds the random streams; v1's value, kept so that the v2 fix changes nothing but full-ref/linkage
RNG_SALT = 1
PROTOCOLS = ("full-ref", "few-ref", "single-ref")
MODES = ("exclude-source", "linkage")

#: probe rows (indices into the probes) -> their similarity to every gallery image, (len(rows), n_gallery)
RowSimilarity = Callable[[np.ndarray], torch.Tensor]


@dataclass
class ProtocolResult:
    ranks: np.ndarray  # (P,) 1-based rank of the true identity per scored probe
    probe_identity: np.ndarray  # (P,) identity index per scored probe (for bootstrap by identity)
    pool: int
    probes: Optional[np.ndarray] = None  # (P,) indices of the scored probes
    unscored: int = 0  # pool probes without a reference of their own identity (exclude-source)
    pool_ids: Optional[np.ndarray] = None  # the pool's identity indices (the columns of ``scores``)
    scores: Optional[np.ndarray] = None  # (P, pool) float32 identity scores, own identity = own score (keep_scores)


class EmbeddingSimilarity:
    """Cosine (dot-product) similarity of probe and gallery embeddings, one block of probe rows at a time,
    on ``device`` (the GPU when there is one): the full matrix never exists."""

    def __init__(self, probes: torch.Tensor, gallery: torch.Tensor, device: Optional[str] = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.probes = probes.to(self.device)
        self.gallery_t = gallery.to(self.device).t().contiguous()
        self.shape = (len(probes), len(gallery))

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        return (self.probes[torch.as_tensor(rows, device=self.device)] @ self.gallery_t).float()


class StreamedSimilarity:
    """A similarity given as a function of probe rows (``rows -> (len(rows), n_gallery)``, numpy or torch)
    with its ``shape``: any pairwise score of embeddings (a recognizer's metric, the edge attack's) streams
    through ``score_protocols`` like ``EmbeddingSimilarity``, computed by the same code one block at a time."""

    def __init__(self, rows: Callable[[np.ndarray], object], shape: tuple[int, int]):
        self.rows, self.shape = rows, (int(shape[0]), int(shape[1]))

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        block = self.rows(rows)
        return (block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))).float()


def _ref_k(protocol: str, k: int) -> Optional[int]:
    return {"full-ref": None, "few-ref": k, "single-ref": 1}[protocol]


@dataclass
class _Layout:
    """What depends only on the gallery, the pool and the seed: the seeded order of each pool identity."""

    ids: np.ndarray  # pool identities, sorted
    in_pool: np.ndarray  # (n_ids,) bool
    position: np.ndarray  # (G,) position of each gallery image in its identity's seeded order; -1 outside the pool
    by_order: np.ndarray  # (n_ids, M) gallery indices of each identity in seeded order, -1 padded


def _layout(gallery_identity: np.ndarray, pool_size: Union[int, str], seed: int) -> _Layout:
    rng = np.random.default_rng([seed, RNG_SALT])
    n_ids = int(gallery_identity.max()) + 1
    ids = np.unique(gallery_identity)
    if pool_size != "all" and pool_size < len(ids):
        ids = np.sort(rng.choice(ids, int(pool_size), replace=False))
    in_pool = np.zeros(n_ids, bool)
    in_pool[ids] = True
    grouped = np.argsort(gallery_identity, kind="stable")  # each identity's gallery indices, increasing
    starts = np.searchsorted(gallery_identity[grouped], np.arange(n_ids + 1))
    counts = np.diff(starts)
    position = np.full(len(gallery_identity), -1, np.int64)
    by_order = np.full((n_ids, int(counts[ids].max())), -1, np.int64)
    for i in ids:
        order = rng.permutation(grouped[starts[i] : starts[i + 1]])
        position[order] = np.arange(len(order))
        by_order[i, : len(order)] = order
    return _Layout(ids, in_pool, position, by_order)


def as_row_function(sim: Union[torch.Tensor, RowSimilarity]) -> RowSimilarity:
    """A matrix as a function of probe rows (a function is returned as it is)."""
    if isinstance(sim, torch.Tensor):
        return lambda rows: sim[torch.as_tensor(rows, device=sim.device)]
    return sim


def score_protocols(
    sim: Union[torch.Tensor, RowSimilarity],
    probe_identity: np.ndarray,
    probe_source: np.ndarray,
    gallery_identity: np.ndarray,
    protocols: Sequence[str] = PROTOCOLS,
    modes: Sequence[str] = MODES,
    k: int = 5,
    pool_size: Union[int, str] = "all",
    score: str = "max",
    seed: int = 0,
    device: Optional[str] = None,
    block_elems: int = 1 << 24,
    keep_scores: bool = False,
) -> dict[str, ProtocolResult]:
    """Every ``protocol/mode`` of one similarity in one streaming pass (see the module doc).

    ``sim``: a (P, G) tensor, or a function of probe rows (see ``RowSimilarity``); ``probe_source[p]``: the
    gallery index of probe p's original (of the probe's identity); identities are small non-negative ints.
    ``block_elems`` bounds one block of rows x gallery; ``keep_scores`` also returns each scored probe's
    identity scores over the pool (float32)."""
    if score not in ("max", "mean"):
        raise ValueError(f"score must be 'max' or 'mean', got {score!r}")
    probe_identity, probe_source = np.asarray(probe_identity), np.asarray(probe_source)
    gallery_identity = np.asarray(gallery_identity)
    if len(probe_source) and (gallery_identity[probe_source] != probe_identity).any():
        raise ValueError("every probe's source must be a gallery image of the probe's identity")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lay = _layout(gallery_identity, pool_size, seed)
    n_ids, n_gal = len(lay.in_pool), len(gallery_identity)
    probes = np.flatnonzero(lay.in_pool[probe_identity])
    rows_of = as_row_function(sim)

    def t(x, dtype=torch.long):
        return torch.as_tensor(x, dtype=dtype, device=dev)

    position, by_order, in_pool = t(lay.position), t(lay.by_order), t(lay.in_pool, torch.bool)
    # every identity's references as a padded (n_ids, m) matrix of gallery indices: reductions are then a
    # gather and a reduce over the last axis (much faster than a scatter); -1 marks padding and non-pool ids
    refs = {}
    for protocol in protocols:
        n_refs = _ref_k(protocol, k)
        cols = by_order if n_refs is None else by_order[:, :n_refs]
        refs[protocol] = (cols.clamp(min=0).reshape(-1), cols >= 0, (cols >= 0).sum(1).double())
    keys = [f"{p}/{m}" for p in protocols for m in modes]
    greater = {key: np.zeros(len(probes), np.int64) for key in keys}
    ties = {key: np.zeros(len(probes), np.int64) for key in keys}
    ok = {key: np.zeros(len(probes), bool) for key in keys}
    kept = {key: np.empty((len(probes), len(lay.ids)), np.float32) for key in keys} if keep_scores else {}
    pool_cols = t(lay.ids)
    m_pos = torch.arange(by_order.shape[1], device=dev)[None, :]
    step = max(1, block_elems // max(1, n_gal, by_order.numel()))
    with torch.no_grad():
        for start in range(0, len(probes), step):
            rows = probes[start : start + step]
            block = rows_of(rows).to(dev)
            if tuple(block.shape) != (len(rows), n_gal):
                raise ValueError(f"similarity of {len(rows)} probe rows has shape {tuple(block.shape)}, expected {(len(rows), n_gal)}")
            block = block.double() if score == "mean" else block.float()
            ident, src = t(probe_identity[rows]), t(probe_source[rows])
            own_cols = by_order[ident]  # (b, M): the probe identity's images in seeded order
            valid = own_cols >= 0
            own_vals = block.gather(1, own_cols.clamp(min=0)).double()
            src_pos = position[src][:, None]
            is_src = valid & (m_pos == src_pos)
            rank_among_others = m_pos - (m_pos > src_pos).long()  # position once the source is taken out
            arange_b = torch.arange(len(rows), device=dev)
            for protocol in protocols:
                flat, valid_refs, counts = refs[protocol]
                vals = block[:, flat].view(len(rows), n_ids, -1)
                if score == "max":
                    sc = vals.masked_fill(~valid_refs, float("-inf")).amax(-1).double()
                else:
                    sc = vals.masked_fill(~valid_refs, 0.0).sum(-1) / counts
                sc[:, ~in_pool] = float("-inf")
                others = sc.clone()
                others[arange_b, ident] = float("-inf")  # the probe is compared against the other identities
                n_refs = _ref_k(protocol, k)
                limit = torch.iinfo(torch.long).max if n_refs is None else n_refs
                for mode in modes:
                    if mode == "exclude-source":
                        use = valid & ~is_src & (rank_among_others < limit)
                    else:  # linkage: the source plus the first k - 1 others (every other for full-ref)
                        use = is_src | (valid & ~is_src & (rank_among_others < limit - 1))
                    if score == "max":
                        own = own_vals.masked_fill(~use, float("-inf")).amax(1)
                    else:
                        own = own_vals.masked_fill(~use, 0.0).sum(1) / use.sum(1).clamp(min=1)
                    key, sl = f"{protocol}/{mode}", slice(start, start + len(rows))
                    greater[key][sl] = (others > own[:, None]).sum(1).cpu().numpy()
                    ties[key][sl] = (others == own[:, None]).sum(1).cpu().numpy()
                    ok[key][sl] = use.any(1).cpu().numpy()
                    if keep_scores:
                        mine = sc.clone()
                        mine[arange_b, ident] = own
                        kept[key][sl] = mine[:, pool_cols].float().cpu().numpy()
    out = {}
    for key in keys:
        scored = ok[key]
        tie_rng = np.random.default_rng([seed, RNG_SALT, 1])
        ranks = 1 + greater[key][scored] + tie_rng.integers(0, ties[key][scored] + 1)
        out[key] = ProtocolResult(ranks=ranks, probe_identity=probe_identity[probes[scored]], pool=len(lay.ids),
                                  probes=probes[scored], unscored=int((~scored).sum()), pool_ids=lay.ids,
                                  scores=kept[key][scored] if keep_scores else None)
    return out


def score_protocol(
    sim: Union[torch.Tensor, RowSimilarity],
    probe_identity: np.ndarray,
    probe_source: np.ndarray,
    gallery_identity: np.ndarray,
    protocol: str,
    mode: str,
    k: int = 5,
    pool_size: Union[int, str] = "all",
    score: str = "max",
    seed: int = 0,
    **kw,
) -> ProtocolResult:
    """One protocol x mode (see ``score_protocols``; ``kw``: device, block_elems, keep_scores)."""
    kw.pop("chunk", None)  # the materialised scorer's row chunk; blocks are sized by block_elems now
    return score_protocols(sim, probe_identity, probe_source, gallery_identity, [protocol], [mode], k, pool_size,
                           score, seed, **kw)[f"{protocol}/{mode}"]
