"""Structure leakage between an original and its anonymized image, measured on edge maps:
boundary F-score within a pixel tolerance, symmetric Chamfer distance, and SSIM of the edge maps.

``edge_ssim`` is skimage's uniform-window SSIM (7x7 window, sample covariances) of the Gaussian-smoothed
(sigma 1) edge maps, not the Gaussian SSIM that ``utility.ssim`` reports: kept so that leakage numbers stay
comparable with earlier results. The window is spelled out below so a change of skimage's defaults cannot
move it."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def to_gray(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def edge_map(gray: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Boolean Canny edges of a float image in [0, 1]: the detector of the leakage metrics, which the
    resynthesis anonymizer and the edge attack use too."""
    from skimage.feature import canny

    return canny(gray, sigma=sigma)


def edge_scores(original: np.ndarray, anonymized: np.ndarray, tolerance: int = 2, sigma: float = 1.0) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    e1, e2 = edge_map(to_gray(original), sigma), edge_map(to_gray(anonymized), sigma)
    diag = float(np.hypot(*e1.shape))
    if not e1.any() or not e2.any():
        both = not e1.any() and not e2.any()
        return {"edge_f": float(both), "chamfer": 0.0 if both else diag, "edge_ssim": float(both)}
    d1 = ndimage.distance_transform_edt(~e1)  # distance to the nearest original edge
    d2 = ndimage.distance_transform_edt(~e2)
    precision = float((d1[e2] <= tolerance).mean())
    recall = float((d2[e1] <= tolerance).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    chamfer = 0.5 * (float(d1[e2].mean()) + float(d2[e1].mean()))
    soft1 = ndimage.gaussian_filter(e1.astype(np.float64), 1.0)
    soft2 = ndimage.gaussian_filter(e2.astype(np.float64), 1.0)
    ssim = float(structural_similarity(soft1, soft2, data_range=max(soft1.max(), soft2.max(), 1e-8), win_size=7,
                                       gaussian_weights=False, use_sample_covariance=True))
    return {"edge_f": f, "chamfer": chamfer, "edge_ssim": ssim}


def leakage_summary(pairs, tolerance: int = 2) -> dict[str, float]:
    """Mean edge scores over (original, anonymized) image pairs."""
    rows = [edge_scores(o, a, tolerance) for o, a in pairs]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"n_pairs": len(rows)}
