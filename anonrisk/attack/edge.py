"""The training-free edge attack: the attacker never touches the anonymizer, it only compares edge maps.

A structure-conditioned anonymizer keeps the edges of the face it redraws. Each image becomes an edge map
(Canny, the detector the leakage metrics use, or the Sobel gradient magnitude), and probe and reference are
compared by

- ``ncc``: normalized cross-correlation of the Gaussian-smoothed maps (the cosine of the zero-mean maps), or
- ``chamfer``: minus the symmetric Chamfer distance between the edge sets (mean distance of each set's
  edge pixels to the other's nearest edge, in pixels).

Both are matrix products over flattened maps, so a gallery of thousands costs seconds.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import Field, model_validator

from anonrisk.attack.base import ATTACKS, Attack
from anonrisk.config.validation import Strict


class EdgeParams(Strict):
    edges: Literal["canny", "sobel"] = "canny"
    sigma: float = Field(1.0, gt=0)  # of the edge detector's Gaussian
    smooth: float = Field(1.5, ge=0)  # ncc: Gaussian smoothing of the maps before correlating
    score: Literal["ncc", "chamfer"] = "ncc"

    @model_validator(mode="after")
    def _chamfer_needs_binary_edges(self):
        if self.score == "chamfer" and self.edges != "canny":
            raise ValueError("score=chamfer needs binary edges (edges=canny)")
        return self


def edge_maps(images: np.ndarray, edges: str = "canny", sigma: float = 1.0) -> np.ndarray:
    """(N,H,W,3) uint8 -> (N,H,W) float32 edge maps: Canny as 0/1, Sobel magnitude scaled to unit mean."""
    from scipy import ndimage

    from anonrisk.evaluate.leakage import edge_map, to_gray

    out = np.empty(images.shape[:3], np.float32)
    for i, im in enumerate(images):
        g = to_gray(im)
        if edges == "canny":
            out[i] = edge_map(g, sigma)
        else:
            gs = ndimage.gaussian_filter(g, sigma)
            mag = np.hypot(ndimage.sobel(gs, 0), ndimage.sobel(gs, 1))
            out[i] = mag / (mag.mean() + 1e-6)
    return out


def ncc_features(maps: np.ndarray, smooth: float) -> np.ndarray:
    """Smoothed, zero-mean, unit-norm flattened maps: their dot product is the normalized cross-correlation."""
    from scipy import ndimage

    flat = np.stack([ndimage.gaussian_filter(m, smooth) if smooth > 0 else m for m in maps]).reshape(len(maps), -1)
    flat = flat - flat.mean(1, keepdims=True)
    return flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-8)


def chamfer_parts(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(edge-pixel weights, distance transforms) of binary edge maps, flattened: what ``chamfer_rows`` needs."""
    from scipy import ndimage

    e = maps > 0.5
    diag = float(np.hypot(*maps.shape[1:]))
    dt = np.stack([ndimage.distance_transform_edt(~m) if m.any() else np.full(m.shape, diag) for m in e])
    weights = e.reshape(len(e), -1).astype(np.float64)
    weights /= np.maximum(weights.sum(1, keepdims=True), 1)  # mean over a map's edge pixels
    return weights, dt.reshape(len(e), -1).astype(np.float64)


def chamfer_rows(probe_parts, gallery_parts) -> np.ndarray:
    """Minus the symmetric Chamfer distance of every probe (rows of ``probe_parts``) x gallery pair: probe
    edges to the nearest gallery edge, and back."""
    (wp, dp), (wg, dg) = probe_parts, gallery_parts
    return -0.5 * (wp @ dg.T + (wg @ dp.T).T)


def chamfer_similarity(probe_maps: np.ndarray, gallery_maps: np.ndarray) -> np.ndarray:
    """Minus the symmetric Chamfer distance between binary edge maps, for every probe x gallery pair."""
    return chamfer_rows(chamfer_parts(probe_maps), chamfer_parts(gallery_maps))


@ATTACKS.register("edge")
class EdgeMatchAttack(Attack):
    Params = EdgeParams
    threat = "no access to the anonymizer, no training: edge maps of probe and reference compared directly"

    def similarity(self, ctx, probes: Sequence, gallery: Sequence):
        from anonrisk.data.io import load_batch
        from anonrisk.evaluate.protocols import StreamedSimilarity

        p = self.p
        pm = edge_maps(load_batch([r.path for r in probes], ctx.image_size), p.edges, p.sigma)
        gm = edge_maps(load_batch([r.path for r in gallery], ctx.image_size), p.edges, p.sigma)
        shape = (len(pm), len(gm))
        # scored one block of probe rows at a time: the probes x gallery matrix never exists
        if p.score == "chamfer":
            (wp, dp), g = chamfer_parts(pm), chamfer_parts(gm)
            return StreamedSimilarity(lambda rows: chamfer_rows((wp[rows], dp[rows]), g), shape)
        fp, fg = ncc_features(pm, p.smooth), ncc_features(gm, p.smooth)
        return StreamedSimilarity(lambda rows: fp[rows] @ fg.T, shape)
